"""Recompile one VPC router reusing what an unchanged part of the model compiled to.

`compile_vpc` builds every group's sets and every ENI's chains from scratch:
about 0.3 s at 10 ENIs and 0.7 s at 500 ENIs x 200 groups of 200 rules (v4
layout), whatever the change. The models of `translators.actions` share every
untouched object with their predecessor, so what a group or an ENI compiles to
can be kept between compiles and reused while the objects it was compiled from
are the very same ones (identity, not equality: no content is compared):

- a group's elements, parts and sets depend on the group (its rules), the
  member lists of the groups its rules reference and the prefix lists they name;
- an ENI's v4 chains depend on the ENI (its group list) and its groups' parts;
- a flat profile's chain and sets depend on its groups' elements.

Flat layout, on top (docs/dataplane.md "Per-change cost"):

- a flat profile side whose groups' elements changed keeps its first-match
  pieces and recomputes them only inside the changed region
  (translators/regional.py), so its set is the same region as `compile_vpc`'s,
  maybe cut differently;
- the VPC-wide objects (port sets, intra sets and chains, dispatch maps) are
  reused where their inputs are the same objects (translators/vpcwide.py);
- a rebuilt group keeps its unchanged rules' elements and buckets.

Every other object is equal to `compile_vpc`'s for the same model, and every
flat set holds the same region (tests/test_regional.py over random chains of
changes; tests/test_control_plane.py). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .compiler import (
    _POLICY_RANK,
    DEFAULT_CT_MARK_BIT,
    DEFAULT_LAYOUT,
    FLAT_LIMIT_MIN,
    FLAT_LIMIT_PER_ELEMENT,
    BucketKey,
    DeniedLog,
    Layout,
    Parts,
    RuleKey,
    _Compiler,
    box_of,
    check_ct_mark_bit,
    flat_set_name,
    key_of,
)
from .flatten import Box
from .network import GroupPeer, Network, PrefixListPeer, Rule, SecurityGroup
from .nft import NftChain, NftRule, NftSet, Program, cyclic_gc_paused
from .regional import (
    MAX_REGION_BOXES,
    BoxBins,
    KeptPieces,
    RuleItem,
    clipped_rules,
    overlapping_rules,
    region_of_change,
    rule_bins,
)
from .vpcwide import FlatProgramMemo, flat_program

_GroupKeys = dict[str, dict[BucketKey, frozenset[RuleKey]]]
_GroupParts = dict[str, dict[BucketKey, Parts]]


@dataclass
class _GroupEntry:
    group: SecurityGroup
    refs: tuple[tuple[bool, str], ...]  # the groups and prefix lists its rules name
    deps: tuple[object, ...]  # the objects the compiled form was derived from
    keys: _GroupKeys
    parts: _GroupParts | None = None
    sets: list[NftSet] | None = None
    # (direction, family) -> its rules binned, for region-restricted updates
    bins: dict[tuple[str, str], BoxBins[RuleItem]] = field(default_factory=dict)


@dataclass
class _Side:
    """One flat profile side as last compiled: what it was compiled from (per group of
    the profile, its buckets of that direction), its pieces kept for the next change
    (None: per-bucket fallback, always recompiled cold), and what it produced."""

    want: str
    deps: tuple[dict[BucketKey, frozenset[RuleKey]], ...]
    pieces: KeptPieces | None
    sets: list[NftSet]
    rules: list[NftRule]


@dataclass
class CompileCache:
    """What the previous compile of one VPC produced, per group, ENI and profile.

    Opaque to callers: pass the same object to each `compile_vpc_cached` of one
    VPC router (with the same table, mark bit and layout) and drop it to start over.
    """

    key: tuple[Any, ...] = ()
    groups: dict[str, _GroupEntry] = field(default_factory=dict)
    chains: dict[tuple[str, str], tuple[tuple[object, ...], NftChain]] = field(default_factory=dict)
    profiles: dict[tuple[str, str], tuple[tuple[object, ...], NftChain, list[NftSet]]] = field(
        default_factory=dict
    )
    sides: dict[tuple[str, str, str], _Side] = field(default_factory=dict)
    flat: FlatProgramMemo = field(default_factory=FlatProgramMemo)
    # (id of a rule, family) -> (the rule, its peer's input, its elements)
    rule_keys: dict[tuple[int, str], tuple[Rule, object, list[RuleKey]]] = field(
        default_factory=dict
    )
    reused: int = 0  # groups, chains and profiles taken from the cache in the last compile
    built: int = 0  # ... and compiled anew
    patched: int = 0  # flat sides updated inside the changed region only (no cold compile)


def _group_refs(group: SecurityGroup) -> tuple[tuple[bool, str], ...]:
    """(is a group, id) of every group and prefix list the group's rules name."""
    refs: set[tuple[bool, str]] = set()
    for rule in group.rules:
        peer = rule.peer
        if isinstance(peer, GroupPeer):
            refs.add((True, peer.group_id))
        elif isinstance(peer, PrefixListPeer):
            refs.add((False, peer.prefix_list_id))
    return tuple(sorted(refs))


def _group_deps(net: Network, refs: tuple[tuple[bool, str], ...]) -> tuple[object, ...]:
    return tuple(
        net._members.get(ref) if is_group else net.prefix_lists.get(ref) for is_group, ref in refs
    )


def _keep_equal_buckets(old: _GroupKeys, new: _GroupKeys) -> _GroupKeys:
    """`new`, with each bucket equal to the old one's being the old object: the sides
    then find it unchanged by identity, once per group instead of once per side."""
    out: _GroupKeys = {}
    for direction, buckets in new.items():
        was = old.get(direction, {})
        out[direction] = {
            b: (was[b] if b in was and was[b] == ks else ks) for b, ks in buckets.items()
        }
    return out


def _carried_bins(old: _GroupEntry, keys: _GroupKeys) -> dict[tuple[str, str], BoxBins[RuleItem]]:
    """The old entry's rule bins brought to `keys` by the buckets that changed (the
    old entry is dropped with this compile, so its bins move over)."""
    out: dict[tuple[str, str], BoxBins[RuleItem]] = {}
    for (direction, fam), bins in old.bins.items():
        was, now = old.keys.get(direction, {}), keys.get(direction, {})
        for b in was.keys() | now.keys():
            if b.family != fam:
                continue
            a, c = was.get(b, frozenset()), now.get(b, frozenset())
            if a is c:
                continue
            rank = (b.priority, _POLICY_RANK[b.policy])
            for k in a - c:
                bins.remove(k, (k, rank, b.policy))
            for k in c - a:
                bins.add(k, (k, rank, b.policy))
        out[(direction, fam)] = bins
    return out


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class _CachedCompiler(_Compiler):
    def __init__(self, cache: CompileCache, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache = cache
        self._fresh: dict[str, _GroupEntry] = {}
        self._rebuilt: set[str] = set()  # groups whose entry this compile built anew
        # Rule elements used by this compile (and the ones of reused groups, below).
        self._rule_keys: dict[tuple[int, str], tuple[Rule, object, list[RuleKey]]] = {}

    def _entry(self, group: SecurityGroup) -> _GroupEntry:
        entry = self._fresh.get(group.group_id)
        if entry is not None:
            return entry
        old = self.cache.groups.get(group.group_id)
        refs = old.refs if old is not None and old.group is group else _group_refs(group)
        deps = _group_deps(self.net, refs)
        if old is not None and old.group is group and _same(old.deps, deps):
            entry = old
            self.cache.reused += 1
        else:
            keys = super().group_keys(group)
            if old is not None:
                keys = _keep_equal_buckets(old.keys, keys)
            entry = _GroupEntry(group, refs, deps, keys)
            if old is not None:
                entry.bins = _carried_bins(old, keys)
            self.cache.built += 1
            self._rebuilt.add(group.group_id)
        self._fresh[group.group_id] = entry
        return entry

    def group_keys(self, group: SecurityGroup) -> _GroupKeys:
        return self._entry(group).keys

    def rule_keys(self, rule: Rule, fam: str) -> list[RuleKey]:
        # A rebuilt group (a member joined a group it references, one rule added)
        # keeps the elements of its other rules: same rule object, same peer input.
        peer = rule.peer
        dep: object = None
        if isinstance(peer, GroupPeer):
            dep = self.net._members.get(peer.group_id)
        elif isinstance(peer, PrefixListPeer):
            dep = self.net.prefix_lists.get(peer.prefix_list_id)
        memo = (id(rule), fam)
        got = self.cache.rule_keys.get(memo)
        if got is None or got[0] is not rule or got[1] is not dep:
            got = (rule, dep, super().rule_keys(rule, fam))
        self._rule_keys[memo] = got
        return got[2]

    def group_parts(self, group: SecurityGroup) -> _GroupParts:
        entry = self._entry(group)
        if entry.parts is None:
            entry.parts = super().group_parts(group)
        return entry.parts

    def group_sets(self, group: SecurityGroup) -> list[NftSet]:
        entry = self._entry(group)
        if entry.sets is None:
            entry.sets = super().group_sets(group)
        return entry.sets

    def rule_chain(self, eni: Any, direction: str) -> NftChain:
        deps: tuple[object, ...] = (
            eni,
            *(self.group_parts(self.net.groups[g])[direction] for g in sorted(set(eni.group_ids))),
        )
        old = self.cache.chains.get((eni.eni_id, direction))
        if old is not None and _same(old[0], deps):
            self.cache.reused += 1
            chain = old[1]
        else:
            self.cache.built += 1
            chain = super().rule_chain(eni, direction)
        self._chains[(eni.eni_id, direction)] = (deps, chain)
        return chain

    def profile_chain(
        self, pid: str, groups: Sequence[SecurityGroup], direction: str
    ) -> tuple[NftChain, list[NftSet]]:
        old = self.cache.profiles.get((pid, direction))
        n = len(groups)
        if (
            old is not None
            and len(old[0]) == 2 * n
            and _same(old[0][n:], groups)
            and self._rebuilt.isdisjoint(g.group_id for g in groups)
        ):
            # The same groups, none rebuilt (program() looked at every group first):
            # the same keys, so the same chain, without building the deps again.
            self.cache.reused += 1
            self._profiles[(pid, direction)] = old
            return old[1], old[2]
        deps = tuple(self.group_keys(g)[direction] for g in groups) + tuple(groups)
        if old is not None and _same(old[0], deps):
            self.cache.reused += 1
            chain, sets = old[1], old[2]
        else:
            self.cache.built += 1
            chain, sets = super().profile_chain(pid, groups, direction)
        self._profiles[(pid, direction)] = (deps, chain, sets)
        return chain, sets

    def profile_side(
        self, pid: str, groups: Sequence[SecurityGroup], direction: str, fam: str, want: str
    ) -> tuple[list[NftSet], list[NftRule]]:
        key = (pid, direction, fam)
        deps = tuple(self.group_keys(g)[direction] for g in groups)
        old = self.cache.sides.get(key)
        side = None
        if not self.counters and old is not None and old.want == want and old.pieces is not None:
            side = self._patched_side(old, deps, groups, direction, fam, want)
        if side is None:
            sets, rules = super().profile_side(pid, groups, direction, fam, want)
            pieces = None
            if (
                not self.counters
                and len(sets) == 1
                and sets[0].name == flat_set_name(pid, direction, fam)
            ):
                # Kept in box order (what the region code reasons in); the set
                # holds them as keys (`key_of`, the kernel's field order).
                elements: list[Any] = sorted(box_of(e) for e in sets[0].elements)  # type: ignore[arg-type]
                pieces = KeptPieces(elements, len(elements))
            side = _Side(want, deps, pieces, sets, rules)
        self._sides[key] = side
        return side.sets, side.rules

    def _patched_side(
        self,
        old: _Side,
        deps: tuple[dict[BucketKey, frozenset[RuleKey]], ...],
        groups: Sequence[SecurityGroup],
        direction: str,
        fam: str,
        want: str,
    ) -> _Side | None:
        """`old` brought to `deps` by recomputing inside the changed region only;
        None when a cold compile of the side is the better (or the only) way."""
        pieces = old.pieces
        assert pieces is not None
        if len(old.deps) != len(deps):
            return None
        region = region_of_change(old.deps, deps, family=fam)  # type: ignore[arg-type]
        if not region:  # nothing of this family changed: the very same set
            return _Side(want, deps, pieces, old.sets, old.rules)
        if len(region) > MAX_REGION_BOXES:
            return None
        bins = [self._rule_bins(g, direction, fam) for g in groups]
        changed = False
        for q in region:
            per_group = [self._overlapping(q, b) for b in bins]
            changed |= pieces.recompute(q, clipped_rules(q, per_group, want))
        if not changed:  # the rules changed, not the region: the very same set
            return _Side(want, deps, pieces, old.sets, old.rules)
        n_rules = sum(len(ks) for d in deps for b, ks in d.items() if b.family == fam)
        limit = max(FLAT_LIMIT_MIN, FLAT_LIMIT_PER_ELEMENT * n_rules)
        if pieces.refragmented() or len(pieces.elements) > limit:
            return None
        self.cache.patched += 1
        flat = old.sets[0]
        sets = [NftSet(flat.name, flat.type, tuple(key_of(b) for b in pieces.elements), flat.flags)]
        return _Side(want, deps, pieces, sets, old.rules)

    def _overlapping(self, q: Box, bins: BoxBins[RuleItem]) -> list[RuleItem]:
        # A group's rules overlapping q, once per compile: a member's address in a
        # referenced group is the same q in every profile holding the referencing group.
        memo = (id(bins), q)
        got = self._overlaps.get(memo)
        if got is None:
            got = self._overlaps[memo] = overlapping_rules(q, bins)
        return got

    def _rule_bins(self, group: SecurityGroup, direction: str, fam: str) -> BoxBins[RuleItem]:
        entry = self._entry(group)
        got = entry.bins.get((direction, fam))
        if got is None:
            got = entry.bins[(direction, fam)] = rule_bins(
                (k, (b.priority, _POLICY_RANK[b.policy]), b.policy)
                for b, ks in entry.keys[direction].items()
                if b.family == fam
                for k in ks
            )
        return got

    def program(self) -> Program:
        self._sides: dict[tuple[str, str, str], _Side] = {}
        self._overlaps: dict[tuple[int, Box], list[RuleItem]] = {}
        self._chains: dict[tuple[str, str], tuple[tuple[object, ...], NftChain]] = {}
        self._profiles: dict[
            tuple[str, str], tuple[tuple[object, ...], NftChain, list[NftSet]]
        ] = {}
        if self.layout == "flat":
            for g in self.groups:  # every entry settled before the profiles look
                self._entry(g)
            program = flat_program(self, self.cache.flat, self.profile_chain)
        else:
            program = super().program()
        # Keep only what this model still has: the cache never outgrows the VPC.
        # Rule elements: the old rules of rebuilt (or deleted) groups that are gone
        # leave the memo (entries are checked by identity: a stale one is never used).
        memo = self.cache.rule_keys
        for gid in self._rebuilt | (self.cache.groups.keys() - self._fresh.keys()):
            was = self.cache.groups.get(gid)
            for r in was.group.rules if was is not None else ():
                for fam in ("ipv4", "ipv6"):
                    if (id(r), fam) not in self._rule_keys:
                        memo.pop((id(r), fam), None)
        memo.update(self._rule_keys)
        self.cache.groups = self._fresh
        self.cache.chains = self._chains
        self.cache.profiles = self._profiles
        # Sides of a profile taken whole from the cache were not visited: keep them.
        for pid, direction in self._profiles:
            for fam in ("ipv4", "ipv6"):
                got = self.cache.sides.get((pid, direction, fam))
                if got is not None:
                    self._sides.setdefault((pid, direction, fam), got)
        self.cache.sides = self._sides
        return program


def compile_vpc_cached(
    network: Network,
    vpc_id: str,
    cache: CompileCache,
    table: str = "nftsg",
    ct_mark_bit: int = DEFAULT_CT_MARK_BIT,
    *,
    layout: Layout = DEFAULT_LAYOUT,
    counters: bool = False,
    denied_log: DeniedLog | None = None,
) -> Program:
    """`compile_vpc(network, vpc_id, table, ct_mark_bit, layout=layout)`, reusing from
    `cache` what the previous compile of this VPC built from the same objects, and
    leaving in it what this one built."""
    if vpc_id not in network.vpcs:
        raise KeyError(f"unknown VPC {vpc_id!r}")
    if layout not in ("flat", "v4"):
        raise ValueError(f"unknown layout {layout!r}")
    check_ct_mark_bit(ct_mark_bit)
    key = (network.vpcs.get(vpc_id), vpc_id, table, ct_mark_bit, layout, counters, denied_log)
    if cache.key != key:
        cache.groups.clear()
        cache.chains.clear()
        cache.profiles.clear()
        cache.sides.clear()
        cache.flat = FlatProgramMemo()
        cache.rule_keys.clear()
        cache.key = key
    cache.reused = cache.built = cache.patched = 0
    with cyclic_gc_paused():
        return _CachedCompiler(
            cache, network, vpc_id, table, ct_mark_bit, layout, counters, denied_log
        ).program()
