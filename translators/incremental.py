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

Everything else (port sets, intra-group sets, dispatch maps) is rebuilt each
time: linear in the VPC's ENIs, with no per-rule work. The output is equal to
`compile_vpc`'s for the same model (tests/test_incremental.py checks this over
chains of actions). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .compiler import (
    DEFAULT_CT_MARK_BIT,
    DEFAULT_LAYOUT,
    BucketKey,
    DeniedLog,
    Layout,
    Parts,
    RuleKey,
    _Compiler,
    check_ct_mark_bit,
)
from .network import GroupPeer, Network, PrefixListPeer, SecurityGroup
from .nft import NftChain, NftSet, Program, cyclic_gc_paused

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
    reused: int = 0  # groups, chains and profiles taken from the cache in the last compile
    built: int = 0  # ... and compiled anew


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


def _same(a: Sequence[object], b: Sequence[object]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class _CachedCompiler(_Compiler):
    def __init__(self, cache: CompileCache, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache = cache
        self._fresh: dict[str, _GroupEntry] = {}

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
            entry = _GroupEntry(group, refs, deps, super().group_keys(group))
            self.cache.built += 1
        self._fresh[group.group_id] = entry
        return entry

    def group_keys(self, group: SecurityGroup) -> _GroupKeys:
        return self._entry(group).keys

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
        deps = tuple(self.group_keys(g)[direction] for g in groups) + tuple(groups)
        old = self.cache.profiles.get((pid, direction))
        if old is not None and _same(old[0], deps):
            self.cache.reused += 1
            chain, sets = old[1], old[2]
        else:
            self.cache.built += 1
            chain, sets = super().profile_chain(pid, groups, direction)
        self._profiles[(pid, direction)] = (deps, chain, sets)
        return chain, sets

    def program(self) -> Program:
        self._chains: dict[tuple[str, str], tuple[tuple[object, ...], NftChain]] = {}
        self._profiles: dict[
            tuple[str, str], tuple[tuple[object, ...], NftChain, list[NftSet]]
        ] = {}
        program = super().program()
        # Keep only what this model still has: the cache never outgrows the VPC.
        self.cache.groups = self._fresh
        self.cache.chains = self._chains
        self.cache.profiles = self._profiles
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
        cache.key = key
    cache.reused = cache.built = 0
    with cyclic_gc_paused():
        return _CachedCompiler(
            cache, network, vpc_id, table, ct_mark_bit, layout, counters, denied_log
        ).program()
