"""Network -> the nftables program of one VPC router (layout: docs/dataplane.md).

Pure and deterministic: the output depends on the model's content, never on the
order of its dicts. Only ids and numbers reach the program.

Rule sets belong to groups, chains to ENIs. Each group has one set per
(direction, bucket, family, part) holding its rules' expanded elements (a CIDR;
the live member addresses of a referenced group; a prefix list's entries). Each
ENI's chain looks its packet up, bucket by bucket, in the sets of its own groups.
So a rule change touches only its group's sets, whatever the group's size, and a
packet's lookups are bounded by its ENI's groups' rules, never by the rest of the
VPC. Addresses, ports and protocols are int spans; overlap checks use an index on
the peer CIDR, not all pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .firstmatch import first_match_region
from .flatten import Ranked, flatten, flatten_labelled
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
    MARK_BITS,
    RETURN,
    BaseHook,
    Concat,
    Counter,
    Ct,
    Key,
    Limit,
    Log,
    Masked,
    Match,
    Meta,
    NftChain,
    NftRule,
    NftSet,
    Payload,
    Program,
    SetRef,
    Span,
    Verdict,
    VerdictMap,
    cyclic_gc_paused,
    jump,
    make_map,
    make_set,
    safe_comment,
)

DEFAULT_TABLE = "nftsg"
# "flat" (v5, docs/dataplane.md): one flattened set per (group list, direction,
# family). "v4": per-group bucket sets, kept to measure against.
Layout = Literal["flat", "v4"]
DEFAULT_LAYOUT: Layout = "flat"
# Field orders the flattening tries (proto always first: a box with restricted
# ports then always has a single ported protocol); the one with fewer boxes wins.
FLAT_ORDERS = ((0, 1, 2, 3, 4), (0, 2, 1, 3, 4))
# Beyond this many boxes per side, a side falls back to per-bucket sets (the
# flattening's worst case is a product of the fields' pieces).
FLAT_LIMIT_MIN = 4096
FLAT_LIMIT_PER_ELEMENT = 8
FAMILIES = ("ipv4", "ipv6")
_BITS = {"ipv4": 32, "ipv6": 128}
_SHORT = {"ipv4": "v4", "ipv6": "v6"}
_ADDR_TYPE = {"ipv4": "ipv4_addr", "ipv6": "ipv6_addr"}
_L3 = {"ipv4": "ip", "ipv6": "ip6"}
_DIR_SHORT = {"egress": "out", "ingress": "in"}
IFNAME = ("ifname",)
# Five fields at most: nftables 1.0.6 packs a concatenation's field types 6 bits
# each into 32 bits, so a sixth field garbles every listing of the set (the kernel
# still matches right). Every protocol goes through the same concatenation
# (`meta l4proto . ... th dport . th sport ...`): nft 1.0.6 lists that back for ICMP,
# ICMPv6 and GRE, while a separate `th dport` match after `meta l4proto gre` makes
# `nft list` abort and after `meta l4proto icmp` lists as `icmp checksum`.
#
# Boxes (RuleKey, flattening, first-match pieces, labels) are in BOX order
# (proto, peer, dport, sport, local); the kernel's key is in KEY_ORDER, indices
# into that box order: peer . dport . proto . sport . local. Why: a pipapo lookup
# maps, field by field, every element still matching the packet to the next
# field's bitmap (`nft_pipapo_avx2_refill`/`_fill` were 25 % of the forwarding
# CPU at 1000 rules), so the work is the number of elements matching the first
# fields. With proto first, a TCP packet matches every TCP and ALL element (2,147
# of 3,355 on the benchmark's server side); first-match pieces are cut last by
# the peer, so with peer then dport first it matches 94 and then 2
# (docs/dataplane.md, "Per-packet cost").
KEY_ORDER = (1, 2, 0, 3, 4)
_BOX_OF_KEY = tuple(KEY_ORDER.index(i) for i in range(5))


def key_of(box: Sequence[Span]) -> tuple[Span, ...]:
    """A box (proto, peer, dport, sport, local) as the kernel set's key (KEY_ORDER)."""
    return tuple(box[i] for i in KEY_ORDER)


def box_of(key: Sequence[Span]) -> tuple[Span, ...]:
    """The inverse of `key_of`: a rule set's element back in box order."""
    return tuple(key[i] for i in _BOX_OF_KEY)


RULE_SET_TYPE: dict[str, tuple[str, ...]] = {
    fam: tuple(
        ("inet_proto", _ADDR_TYPE[fam], "inet_service", "inet_service", _ADDR_TYPE[fam])[i]
        for i in KEY_ORDER
    )
    for fam in FAMILIES
}
INTERVAL = ("interval",)

ALL_PROTOS = Span(0, 255)
ALL_PORTS = Span(0, 65535)
ALL_ADDRS = {fam: Span(0, (1 << bits) - 1) for fam, bits in _BITS.items()}

_NFPROTO = {fam: Match(Meta("nfproto"), fam) for fam in FAMILIES}

# Bucket order inside a chain: priority ascending, drop before accept, ipv4 first.
_POLICY_RANK = {"drop": 0, "accept": 1}
_DIRECTIONS = ("egress", "ingress")


class BucketKey(NamedTuple):
    priority: int
    policy: str
    family: str


def _bucket_order(b: BucketKey) -> tuple[int, int, str]:
    return (b.priority, _POLICY_RANK[b.policy], b.family)


# A rule-set element: (proto, peer, dport, sport, local).
RuleKey = tuple[Span, Span, Span, Span, Span]
# Parts of one set: no two elements of one part overlap; each part sorted; at
# least one part (`_0`, maybe empty, so that an element arriving in an empty
# bucket, e.g. a referenced group's first member, is an element change).
Parts = tuple[tuple[RuleKey, ...], ...]


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


def group_set_name(group_id: str, direction: str, bkey: BucketKey, part: int) -> str:
    """`g_<group>_<in|out>_p<prio>_<a|d>_<v4|v6>_<part>`."""
    prio, policy, fam = bkey
    return f"g_{group_id}_{_DIR_SHORT[direction]}_p{prio}_{policy[0]}_{_SHORT[fam]}_{part}"


def profile_id(group_ids: Iterable[str]) -> str:
    """The name of an ENI's group list: ENIs with the same groups (in any order)
    share their rule chains and flattened sets. A hash, because ten 64-character
    ids do not fit in an object name; stable, so one ENI's change renames nothing."""
    key = ",".join(sorted(set(group_ids)))
    return "p" + hashlib.blake2s(key.encode(), digest_size=6).hexdigest()


def flat_set_name(pid: str, direction: str, fam: str) -> str:
    """`f_<profile>_<in|out>_<v4|v6>`."""
    return f"f_{pid}_{_DIR_SHORT[direction]}_{_SHORT[fam]}"


def counted_set_name(pid: str, direction: str, fam: str) -> str:
    """`c_<profile>_<in|out>_<v4|v6>`: where a rule with the default's verdict decides
    (hit counters only)."""
    return f"c_{pid}_{_DIR_SHORT[direction]}_{_SHORT[fam]}"


def bucket_set_name(pid: str, direction: str, bkey: BucketKey, part: int) -> str:
    """`b_<profile>_<in|out>_p<prio>_<a|d>_<v4|v6>_<part>` (fallback of one side)."""
    prio, policy, fam = bkey
    return f"b_{pid}_{_DIR_SHORT[direction]}_p{prio}_{policy[0]}_{_SHORT[fam]}_{part}"


_VERDICT_OF = {"accept": RETURN, "drop": DROP}

# NFLOG prefix of the denied-flow log rules: `nftsg:<profile>:<in|out>`; the agent
# reads the profile and the side back from it (agent/nflog.py).
LOG_PREFIX = "nftsg"


def log_prefix(pid: str, direction: str) -> str:
    return f"{LOG_PREFIX}:{pid}:{_DIR_SHORT[direction]}"


@dataclass(frozen=True)
class DeniedLog:
    """Denied-flow logging (docs/dataplane.md "Denied-flow logs"): profiles holding
    one of `groups` log, before each of their dropping rules, to NFLOG `nflog_group`,
    at most `rate` packets per second per such rule (the drop itself is never limited)."""

    groups: frozenset[str]
    nflog_group: int = 2
    rate: int = 10


def with_log_rules(rules: Sequence[NftRule], prefix: str, log: DeniedLog) -> tuple[NftRule, ...]:
    """Before every rule ending in `drop`, a rule with the same matches (counters
    left out), `limit` and `log`, and NO verdict: over the rate only the copy to
    NFLOG is skipped, never the drop."""
    out: list[NftRule] = []
    for rule in rules:
        st = rule.statements
        if st and st[-1] == DROP:
            matches = tuple(x for x in st[:-1] if not isinstance(x, Counter))
            out.append(
                NftRule(
                    (*matches, Limit(log.rate), Log(prefix, log.nflog_group)),
                    safe_comment(f"log {rule.comment}"),
                )
            )
        out.append(rule)
    return tuple(out)


class _Compiler:
    def __init__(
        self,
        network: Network,
        vpc_id: str,
        table: str,
        ct_mark_bit: int,
        layout: Layout = DEFAULT_LAYOUT,
        counters: bool = False,
        denied_log: DeniedLog | None = None,
    ) -> None:
        self.net = network
        self.denied_log = denied_log
        self.vpc_id = vpc_id
        self.table = table
        self.ct_mark_bit = ct_mark_bit
        self.layout = layout
        # Per-rule hit counters (flat layout; docs/dataplane.md "Hit counters").
        self.counters = counters
        # group id -> direction -> bucket -> its rules' elements (not split)
        self._group_keys: dict[str, dict[str, dict[BucketKey, frozenset[RuleKey]]]] = {}
        self.enis: list[Eni] = sorted(
            (e for e in network.enis.values() if e.vpc_id == vpc_id), key=lambda e: e.eni_id
        )
        self.groups: list[SecurityGroup] = sorted(
            (g for g in network.groups.values() if g.vpc_id == vpc_id), key=lambda g: g.group_id
        )
        self._net_spans: dict[int, tuple[IPNetwork, Span]] = {}
        self._member_spans: dict[tuple[str, str], tuple[Span, ...]] = {}
        self._pl_spans: dict[str, tuple[Span, ...]] = {}
        # group id -> direction -> bucket -> parts (sorted buckets)
        self._group_parts: dict[str, dict[str, dict[BucketKey, Parts]]] = {}
        self._lookups = {
            (direction, fam): self._lookup(direction, fam)
            for direction in _DIRECTIONS
            for fam in FAMILIES
        }

    # ----------------------------------------------------------------- elements

    def net_span(self, net: IPNetwork) -> Span:
        # Keyed by identity: hashing ipaddress networks is slow and collides
        # often; the model's objects live as long as this compiler.
        got = self._net_spans.get(id(net))
        if got is None:
            got = self._net_spans[id(net)] = (net, _span(net))
        return got[1]

    def member_spans(self, group_id: str, fam: str) -> tuple[Span, ...]:
        """Live private addresses of the group's members in this VPC, as /32 or /128 blocks."""
        got = self._member_spans.get((group_id, fam))
        if got is None:
            version = 4 if fam == "ipv4" else 6
            out: list[Span] = []
            for eni_id in self.net.members(group_id):
                eni = self.net.enis[eni_id]
                if eni.vpc_id != self.vpc_id:
                    continue
                out.extend(Span(int(a), int(a)) for a in eni.addresses if a.version == version)
            got = self._member_spans[(group_id, fam)] = tuple(out)
        return got

    def prefix_list_spans(self, pl_id: str) -> tuple[Span, ...]:
        got = self._pl_spans.get(pl_id)
        if got is None:
            got = tuple(self.net_span(n) for n in self.net.prefix_lists[pl_id].entries)
            self._pl_spans[pl_id] = got
        return got

    def peer_spans(self, rule: Rule, fam: str) -> tuple[Span, ...]:
        peer = rule.peer
        if isinstance(peer, CidrPeer):
            return (self.net_span(peer.network),)
        if isinstance(peer, PrefixListPeer):
            return self.prefix_list_spans(peer.prefix_list_id)
        return self.member_spans(peer.group_id, fam)

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
        """The rule's elements in `fam`: one per peer block (none while a referenced
        group has no address of that family)."""
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

    def group_keys(self, group: SecurityGroup) -> dict[str, dict[BucketKey, frozenset[RuleKey]]]:
        """Per direction, the group's buckets (every one a rule of it can reach, even
        while its expansion is empty) and their elements."""
        got = self._group_keys.get(group.group_id)
        if got is None:
            keys: dict[str, dict[BucketKey, set[RuleKey]]] = {d: {} for d in _DIRECTIONS}
            for rule in group.rules:
                for fam in self.rule_families(rule):
                    bkey = BucketKey(rule.priority, rule.policy, fam)
                    keys[rule.direction].setdefault(bkey, set()).update(self.rule_keys(rule, fam))
            got = {d: {b: frozenset(ks) for b, ks in keys[d].items()} for d in _DIRECTIONS}
            self._group_keys[group.group_id] = got
        return got

    def group_parts(self, group: SecurityGroup) -> dict[str, dict[BucketKey, Parts]]:
        """Per direction, the group's buckets and their parts (layout v4)."""
        got = self._group_parts.get(group.group_id)
        if got is None:
            keys = self.group_keys(group)
            got = {
                d: {
                    bkey: tuple(tuple(sorted(p)) for p in split_parts(ks)) or ((),)
                    for bkey, ks in sorted(keys[d].items(), key=lambda kv: _bucket_order(kv[0]))
                }
                for d in _DIRECTIONS
            }
            self._group_parts[group.group_id] = got
        return got

    def group_sets(self, group: SecurityGroup) -> list[NftSet]:
        return [
            NftSet(
                group_set_name(group.group_id, d, bkey, k),
                RULE_SET_TYPE[bkey.family],
                tuple(key_of(e) for e in part),
                INTERVAL,
            )
            for d in _DIRECTIONS
            for bkey, parts in self.group_parts(group)[d].items()
            for k, part in enumerate(parts)
        ]

    # ----------------------------------------------------------------- chains

    @staticmethod
    def _lookup(direction: str, fam: str) -> Concat:
        l3 = _L3[fam]
        peer, local = ("daddr", "saddr") if direction == "egress" else ("saddr", "daddr")
        box = (
            Meta("l4proto"),
            Payload(l3, peer),
            Payload("th", "dport"),
            Payload("th", "sport"),
            Payload(l3, local),
        )
        return Concat(tuple(box[i] for i in KEY_ORDER))

    def rule_chain(self, eni: Eni, direction: str) -> NftChain:
        """`out_<eni>` / `in_<eni>`: per bucket (union of its groups'), per group of the ENI
        having it and per part, one lookup in the group's set; then the default."""
        groups = sorted((self.net.groups[g] for g in set(eni.group_ids)), key=lambda g: g.group_id)
        having: dict[BucketKey, list[SecurityGroup]] = {}
        for g in groups:
            for bkey in self.group_parts(g)[direction]:
                having.setdefault(bkey, []).append(g)
        name = f"{_DIR_SHORT[direction]}_{eni.eni_id}"
        rules: list[NftRule] = []
        for bkey in sorted(having, key=_bucket_order):
            prio, policy, fam = bkey
            verdict = DROP if policy == "drop" else RETURN
            nfproto = _NFPROTO[fam]
            lookup = self._lookups[(direction, fam)]
            for g in having[bkey]:
                for k in range(len(self.group_parts(g)[direction][bkey])):
                    rules.append(
                        NftRule(
                            (
                                nfproto,
                                Match(
                                    lookup, SetRef(group_set_name(g.group_id, direction, bkey, k))
                                ),
                                verdict,
                            ),
                            safe_comment(f"p{prio} {policy} {fam} {g.group_id} part {k}"),
                        )
                    )
        advanced = any(not g.is_basic for g in groups)
        default = DROP if direction == "ingress" or advanced else RETURN
        kind = "advanced" if advanced else "basic"
        rules.append(NftRule((default,), safe_comment(f"default {direction} {kind} {eni.eni_id}")))
        return NftChain(name, tuple(rules))

    # ----------------------------------------------------------------- flat layout

    def profile_side(
        self, pid: str, groups: Sequence[SecurityGroup], direction: str, fam: str, want: str
    ) -> tuple[list[NftSet], list[NftRule]]:
        """One family of one side of a group list: the flattened set of the region
        where the verdict is `want` (the non-default one), looked up once; or, if
        flattening would blow up, per-bucket sets of the pooled rules (v4's order)."""
        if self.counters:
            counted = self.counted_side(pid, groups, direction, fam, want)
            if counted is not None:
                return counted
        pooled: dict[BucketKey, set[RuleKey]] = {}
        for g in groups:
            for bkey, keys in self.group_keys(g)[direction].items():
                if bkey.family == fam:
                    pooled.setdefault(bkey, set()).update(keys)
        ranked = [
            Ranked(k, (b.priority, _POLICY_RANK[b.policy]), b.policy == want)
            for b, ks in pooled.items()
            for k in ks
        ]
        domain = (ALL_PROTOS, ALL_ADDRS[fam], ALL_PORTS, ALL_PORTS, ALL_ADDRS[fam])
        limit = max(FLAT_LIMIT_MIN, FLAT_LIMIT_PER_ELEMENT * len(ranked))
        # First-match pieces: exact and far fewer than the canonical diagram's boxes
        # (docs/dataplane.md, "v6"); the diagram only if they would exceed the limit.
        boxes = first_match_region(ranked, limit)
        if boxes is None:
            boxes = flatten(ranked, domain, FLAT_ORDERS, limit)
        if boxes is not None:
            return self.flat_side(pid, direction, fam, want, tuple(boxes))
        nfproto = _NFPROTO[fam]
        lookup = self._lookups[(direction, fam)]
        sets: list[NftSet] = []
        rules: list[NftRule] = []
        for bkey in sorted(pooled, key=_bucket_order):
            parts = [tuple(sorted(p)) for p in split_parts(pooled[bkey])] or [()]
            for k, part in enumerate(parts):
                name = bucket_set_name(pid, direction, bkey, k)
                elements = tuple(key_of(k) for k in part)
                sets.append(NftSet(name, RULE_SET_TYPE[fam], elements, INTERVAL))
                rules.append(
                    NftRule(
                        (nfproto, Match(lookup, SetRef(name)), _VERDICT_OF[bkey.policy]),
                        safe_comment(f"p{bkey.priority} {bkey.policy} {fam} part {k}"),
                    )
                )
        return sets, rules

    def flat_side(
        self, pid: str, direction: str, fam: str, want: str, boxes: Sequence[Sequence[Span]]
    ) -> tuple[list[NftSet], list[NftRule]]:
        """The flat set of a side (its disjoint `boxes`, in box order) and its one lookup
        rule; the set's elements are the boxes as keys (`key_of`)."""
        name = flat_set_name(pid, direction, fam)
        lookup = self._lookups[(direction, fam)]
        rule = NftRule(
            (_NFPROTO[fam], Match(lookup, SetRef(name)), _VERDICT_OF[want]),
            safe_comment(f"{want} {fam} flat"),
        )
        elements = tuple(key_of(b) for b in boxes)
        return [NftSet(name, RULE_SET_TYPE[fam], elements, INTERVAL)], [rule]

    def counted_side(
        self, pid: str, groups: Sequence[SecurityGroup], direction: str, fam: str, want: str
    ) -> tuple[list[NftSet], list[NftRule]] | None:
        """`profile_side` with per-element counters: the flat set's boxes each decided by
        one ECS rule (labelled with its id), then a second set `c_...` of the boxes
        where a rule with the default's verdict decides, with the default's verdict.
        The second lookup is only reached by packets that already fall to the default,
        so on the side whose default is drop it costs allowed flows nothing. None when
        either flattening exceeds the limit (the side is then written uncounted)."""
        best: dict[tuple[RuleKey, tuple[int, int]], tuple[str, str]] = {}
        for g in groups:
            for rule in g.rules:
                if rule.direction != direction or fam not in self.rule_families(rule):
                    continue
                rank = (rule.priority, _POLICY_RANK[rule.policy])
                who = (rule.group_id, rule.rule_id)
                for k in self.rule_keys(rule, fam):
                    got = best.get((k, rank))
                    if got is None or who < got:
                        best[(k, rank)] = who
        # Sorted by (rank, group id, rule id): among rules of equal rank holding a
        # packet the first decides, as in the evaluator, and no dict order leaks in.
        items = sorted(best.items(), key=lambda kv: (kv[0][1], kv[1], kv[0][0]))
        labels = [rule_id for _, (_, rule_id) in items]
        domain = (ALL_PROTOS, ALL_ADDRS[fam], ALL_PORTS, ALL_PORTS, ALL_ADDRS[fam])
        limit = max(FLAT_LIMIT_MIN, FLAT_LIMIT_PER_ELEMENT * len(items))
        nfproto = _NFPROTO[fam]
        lookup = self._lookups[(direction, fam)]
        other = "drop" if want == "accept" else "accept"
        sets: list[NftSet] = []
        rules: list[NftRule] = []
        for verdict, name in (
            (want, flat_set_name(pid, direction, fam)),
            (other, counted_set_name(pid, direction, fam)),
        ):
            ranked = [Ranked(k, rank, (rank[1] == _POLICY_RANK[verdict])) for (k, rank), _ in items]
            boxes = flatten_labelled(ranked, domain, FLAT_ORDERS, limit)
            if boxes is None:
                return None
            sets.append(
                NftSet(
                    name,
                    RULE_SET_TYPE[fam],
                    tuple(key_of(b) for b, _ in boxes),
                    INTERVAL,
                    counter=True,
                    labels=tuple(labels[i] for _, i in boxes),
                )
            )
            rules.append(
                NftRule(
                    (nfproto, Match(lookup, SetRef(name)), _VERDICT_OF[verdict]),
                    safe_comment(f"{verdict} {fam} {'flat' if verdict == want else 'counted'}"),
                )
            )
        return sets, rules

    def profile_chain(
        self, pid: str, groups: Sequence[SecurityGroup], direction: str
    ) -> tuple[NftChain, list[NftSet]]:
        """`out_<profile>` / `in_<profile>`: per family one lookup, then the default."""
        advanced = any(not g.is_basic for g in groups)
        default_drop = direction == "ingress" or advanced
        want = "accept" if default_drop else "drop"
        rules: list[NftRule] = []
        sets: list[NftSet] = []
        for fam in FAMILIES:
            side_sets, side_rules = self.profile_side(pid, groups, direction, fam, want)
            sets.extend(side_sets)
            rules.extend(side_rules)
        kind = "advanced" if advanced else "basic"
        default = DROP if default_drop else RETURN
        # Counted: the default rule counts too (packets no rule decided).
        statements = (Counter(), default) if self.counters else (default,)
        rules.append(NftRule(statements, safe_comment(f"default {direction} {kind}")))
        log = self.denied_log
        if log is not None and any(g.group_id in log.groups for g in groups):
            return (
                NftChain(
                    f"{_DIR_SHORT[direction]}_{pid}",
                    with_log_rules(rules, log_prefix(pid, direction), log),
                ),
                sets,
            )
        return NftChain(f"{_DIR_SHORT[direction]}_{pid}", tuple(rules)), sets

    def profiles(self) -> dict[str, list[SecurityGroup]]:
        """Profile id -> its groups (sorted), for every group list of an ENI of the VPC."""
        out: dict[str, list[SecurityGroup]] = {}
        for eni in self.enis:
            pid = profile_id(eni.group_ids)
            if pid not in out:
                out[pid] = sorted(
                    (self.net.groups[g] for g in set(eni.group_ids)), key=lambda g: g.group_id
                )
        return out

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
        for fam in FAMILIES:
            sets.append(
                make_set(f"port_addrs_{_SHORT[fam]}", ("ifname", _ADDR_TYPE[fam]), port_addrs[fam])
            )
        if self.layout == "v4":
            for g in self.groups:
                sets.extend(self.group_sets(g))
        else:
            for pid, groups in sorted(self.profiles().items()):
                for direction in _DIRECTIONS:
                    chain, chain_sets = self.profile_chain(pid, groups, direction)
                    chains.append(chain)
                    sets.extend(chain_sets)

        # Intra-group shortcut: one port set per basic Accept group of the VPC
        # (kept while empty, so joining it only adds an element).
        intra_groups = [
            g.group_id for g in self.groups if g.is_basic and g.inner_access_policy == "Accept"
        ]
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

        intra: dict[Key, Verdict] = {}
        egress: dict[Key, Verdict] = {}
        ingress: dict[Key, Verdict] = {}
        for eni in self.enis:
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
            if self.layout == "v4":
                chains.append(self.rule_chain(eni, "egress"))
                chains.append(self.rule_chain(eni, "ingress"))
                egress[(eni.ifname,)] = jump(f"out_{eni.eni_id}")
                ingress[(eni.ifname,)] = jump(f"in_{eni.eni_id}")
            else:
                pid = profile_id(eni.group_ids)
                egress[(eni.ifname,)] = jump(f"out_{pid}")
                ingress[(eni.ifname,)] = jump(f"in_{pid}")
        maps = [
            make_map("intra_dispatch", IFNAME, intra),
            make_map("egress_dispatch", IFNAME, egress),
            make_map("ingress_dispatch", IFNAME, ingress),
        ]
        chains.append(forward_chain(self.ct_mark_bit))
        return Program("inet", self.table, tuple(sets), tuple(maps), tuple(chains))


# The agent sets this bit of the conntrack mark on tracked flows that the current
# model denies (and clears it when they are allowed again). Dropping flows with
# the bit set, in both directions, cuts a revoked flow at once, and, unlike
# deleting its entry, keeps the flow's identity: a packet of the responder cannot
# start the flow over in the other direction, and restoring the rule revives it.
#
# Only this bit is ours: the rule matches it under a mask and the agent sets and
# clears it alone, so other users of ct marks on the host (policy routing,
# CONNMARK setups, VPN tools) keep the other 31 bits. Those users mostly take
# small values and the low bits, hence a high bit by default. Not bit 31: nft
# lists a match on it as a prefix (`ct mark 0x80000000/1`), which reads badly;
# bit 30 is the highest one listed as `ct mark & 0x40000000 == 0x40000000`.
# Configurable (NFTSG_CT_MARK_BIT) for a host where bit 30 is taken.
DEFAULT_CT_MARK_BIT = 0x40000000


def check_ct_mark_bit(bit: object) -> int:
    """`bit` if it is exactly one bit of the 32-bit conntrack mark; ValueError otherwise."""
    if (
        not isinstance(bit, int)
        or isinstance(bit, bool)
        or not 0 < bit < 1 << MARK_BITS
        or bit & (bit - 1)
    ):
        shown = f"{bit:#x}" if isinstance(bit, int) and not isinstance(bit, bool) else repr(bit)
        raise ValueError(
            f"the conntrack mark bit must be exactly one bit of the 32-bit mark "
            f"(such as {DEFAULT_CT_MARK_BIT:#x}), not {shown}"
        )
    return bit


def forward_chain(ct_mark_bit: int = DEFAULT_CT_MARK_BIT) -> NftChain:
    """The base chain, in the order of docs/dataplane.md §"Base chain `forward`, in order
    (v4 and v5)"; every rule there is static.

    `ct_mark_bit` is the conntrack mark bit of revoked flows (`DEFAULT_CT_MARK_BIT`).
    """
    bit = check_ct_mark_bit(ct_mark_bit)
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
            NftRule((Match(Masked(Ct("mark"), bit), bit), DROP), "flows the model now denies"),
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
            NftRule((VerdictMap(Meta("iifname"), SetRef("egress_dispatch")),), "sender egress"),
            NftRule((VerdictMap(Meta("oifname"), SetRef("ingress_dispatch")),), "receiver ingress"),
            NftRule((Match(Meta("oifname"), SetRef("ports")), ACCEPT), "known ports"),
        ),
        BaseHook("filter", "forward", 0, "drop"),
    )


def compile_vpc(
    network: Network,
    vpc_id: str,
    table: str = DEFAULT_TABLE,
    ct_mark_bit: int = DEFAULT_CT_MARK_BIT,
    *,
    layout: Layout = DEFAULT_LAYOUT,
    counters: bool = False,
    denied_log: DeniedLog | None = None,
) -> Program:
    """The program of the VPC router of `vpc_id`; `ct_mark_bit` as in `forward_chain`;
    `counters`: per-rule hit counters (flat layout only; ignored by v4);
    `denied_log`: NFLOG rules for profiles of the logged groups (flat layout only)."""
    if vpc_id not in network.vpcs:
        raise KeyError(f"unknown VPC {vpc_id!r}")
    if layout not in ("flat", "v4"):
        raise ValueError(f"unknown layout {layout!r}")
    check_ct_mark_bit(ct_mark_bit)
    with cyclic_gc_paused():
        return _Compiler(
            network, vpc_id, table, ct_mark_bit, layout, counters, denied_log
        ).program()


def compile_all(
    network: Network,
    table: str = DEFAULT_TABLE,
    ct_mark_bit: int = DEFAULT_CT_MARK_BIT,
    *,
    layout: Layout = DEFAULT_LAYOUT,
    counters: bool = False,
    denied_log: DeniedLog | None = None,
) -> dict[str, Program]:
    """One program per VPC, keyed (and ordered) by VPC id."""
    return {
        vpc_id: compile_vpc(
            network,
            vpc_id,
            table,
            ct_mark_bit,
            layout=layout,
            counters=counters,
            denied_log=denied_log,
        )
        for vpc_id in sorted(network.vpcs)
    }
