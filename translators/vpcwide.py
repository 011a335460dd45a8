"""The VPC-wide objects of a flat program, rebuilt only where a change reaches them.

After region-restricted sides (translators/regional.py), most of a change's compile
was the walk over the whole VPC that `_Compiler.program` does for every model: a
profile id (a hash) per ENI, the port sets, one intra set per basic Accept group,
the intra chains and the three dispatch maps, then every profile's chains,
5-20 ms at 500 ENIs whatever the change. `FlatProgramMemo` keeps, between two
compiles of one VPC, what each of those was built from and the object it gave:

- per ENI (the very object, and the set of basic Accept groups of the VPC): its
  profile id, intra chain and dispatch entries;
- the port sets, from every port's (ifname, addresses);
- an intra set, from its group's member tuple and those members' ifnames;
- the maps, from the dispatch entries.

An unchanged input gives the previous object itself, so the diff skips it by
identity (translators/diff.py). It writes what `_Compiler.program` writes for the
flat layout (the tests compare every object with a cold compile:
tests/test_regional.py). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .compiler import (
    _ADDR_TYPE,
    _DIRECTIONS,
    _SHORT,
    FAMILIES,
    IFNAME,
    forward_chain,
    profile_id,
)
from .network import Eni, SecurityGroup
from .nft import ACCEPT as _ACCEPT
from .nft import (
    Key,
    Match,
    Meta,
    NftChain,
    NftMap,
    NftRule,
    NftSet,
    Program,
    SetRef,
    Span,
    Verdict,
    jump,
    make_map,
    make_set,
    safe_comment,
)

# (intra chain or None, intra entry or None, egress entry, ingress entry, profile id)
_EniParts = tuple[NftChain | None, tuple[Key, Verdict] | None, Verdict, Verdict, str]


@dataclass
class FlatProgramMemo:
    """What the last flat compile of one VPC built its VPC-wide objects from."""

    accept_groups: frozenset[str] = frozenset()
    enis: dict[str, tuple[Eni, _EniParts]] = field(default_factory=dict)
    ports_key: tuple[Any, ...] | None = None
    port_sets: list[NftSet] = field(default_factory=list)
    intra: dict[str, tuple[tuple[str, ...], tuple[Key, ...], NftSet]] = field(default_factory=dict)
    maps_key: tuple[Any, ...] | None = None
    maps: list[NftMap] = field(default_factory=list)
    profiles: dict[str, tuple[tuple[SecurityGroup, ...], list[SecurityGroup]]] = field(
        default_factory=dict
    )
    forward: NftChain | None = None


def _eni_parts(eni: Eni, accept_groups: frozenset[str]) -> _EniParts:
    mine = sorted(set(eni.group_ids) & accept_groups)
    chain = intra = None
    if mine:
        chain = NftChain(
            f"intra_{eni.eni_id}",
            tuple(
                NftRule(
                    (Match(Meta("iifname"), SetRef(f"intra_{gid}")), _ACCEPT),
                    safe_comment(f"intra {gid}"),
                )
                for gid in mine
            ),
        )
        intra = ((eni.ifname,), jump(f"intra_{eni.eni_id}"))
    pid = profile_id(eni.group_ids)
    return chain, intra, jump(f"out_{pid}"), jump(f"in_{pid}"), pid


def flat_program(
    c: Any,
    memo: FlatProgramMemo,
    profile_chain: Callable[[str, Sequence[SecurityGroup], str], tuple[NftChain, list[NftSet]]],
) -> Program:
    """`_Compiler.program()` of the flat layout for compiler `c`, from `memo`
    where the inputs did not change; leaves this compile's inputs in `memo`."""
    net = c.net
    enis: list[Eni] = c.enis
    groups: list[SecurityGroup] = c.groups
    externals = sorted(net.externals_in_vpc(c.vpc_id), key=lambda x: x.name)
    sets: list[NftSet] = []
    chains: list[NftChain] = []

    # Port sets: from every port's name and addresses (an ENI replaced by a join
    # keeps its addresses object, so this compares by identity, item by item).
    ports_key = tuple((p.ifname, p.addresses) for p in (*enis, *externals))
    if ports_key != memo.ports_key:
        port_addrs: dict[str, set[Key]] = {"ipv4": set(), "ipv6": set()}
        ports: set[Key] = set()
        for p in (*enis, *externals):
            ports.add((p.ifname,))
            for a in p.addresses:
                fam = "ipv4" if a.version == 4 else "ipv6"
                port_addrs[fam].add((p.ifname, Span(int(a), int(a))))
        memo.port_sets = [make_set("ports", IFNAME, ports)] + [
            make_set(f"port_addrs_{_SHORT[fam]}", ("ifname", _ADDR_TYPE[fam]), port_addrs[fam])
            for fam in FAMILIES
        ]
        memo.ports_key = ports_key
    sets.extend(memo.port_sets)

    # Profiles: id per ENI object, groups per profile (the objects of this model).
    accept = frozenset(
        g.group_id for g in groups if g.is_basic and g.inner_access_policy == "Accept"
    )
    # A group becoming (or ceasing to be) basic Accept changes its members' intra
    # chains only.
    flipped = accept ^ memo.accept_groups
    memo.accept_groups = accept
    parts: list[_EniParts] = []
    fresh_enis: dict[str, tuple[Eni, _EniParts]] = {}
    for eni in enis:
        got = memo.enis.get(eni.eni_id)
        if got is None or got[0] is not eni or (flipped and not flipped.isdisjoint(eni.group_ids)):
            got = (eni, _eni_parts(eni, accept))
        fresh_enis[eni.eni_id] = got
        parts.append(got[1])
    memo.enis = fresh_enis

    profiles: dict[str, tuple[tuple[SecurityGroup, ...], list[SecurityGroup]]] = {}
    for eni, p in zip(enis, parts, strict=True):
        pid = p[4]
        if pid in profiles:
            continue
        now = tuple(net.groups[g] for g in eni.group_ids)
        old = memo.profiles.get(pid)
        if old is not None and len(old[0]) == len(now) and all(map(_is, old[0], now)):
            profiles[pid] = old
        else:
            ordered = sorted({g.group_id: g for g in now}.values(), key=lambda g: g.group_id)
            profiles[pid] = (now, ordered)
    memo.profiles = profiles
    for pid in sorted(profiles):
        for direction in _DIRECTIONS:
            chain, chain_sets = profile_chain(pid, profiles[pid][1], direction)
            chains.append(chain)
            sets.extend(chain_sets)

    # Intra sets: from the group's member tuple and its members' ifnames.
    fresh_intra: dict[str, tuple[tuple[str, ...], tuple[Key, ...], NftSet]] = {}
    for gid in sorted(accept):
        members = net.members(gid)
        was = memo.intra.get(gid)
        if was is not None and was[0] is members:
            fresh_intra[gid] = was
        else:
            elements = tuple(
                sorted({(net.enis[e].ifname,) for e in members if net.enis[e].vpc_id == c.vpc_id})
            )
            s = was[2] if was is not None and was[1] == elements else None
            if s is None:
                s = NftSet(f"intra_{gid}", IFNAME, elements)
            fresh_intra[gid] = (members, elements, s)
        sets.append(fresh_intra[gid][2])
    memo.intra = fresh_intra

    # Intra chains and the dispatch maps.
    for p in parts:
        if p[0] is not None:
            chains.append(p[0])
    maps_key = tuple(p[1:4] for p in parts) + tuple(e.ifname for e in enis)
    if maps_key != memo.maps_key:
        intra: dict[Key, Verdict] = {}
        egress: dict[Key, Verdict] = {}
        ingress: dict[Key, Verdict] = {}
        for eni, p in zip(enis, parts, strict=True):
            if p[1] is not None:
                intra[p[1][0]] = p[1][1]
            egress[(eni.ifname,)] = p[2]
            ingress[(eni.ifname,)] = p[3]
        memo.maps = [
            make_map("intra_dispatch", IFNAME, intra),
            make_map("egress_dispatch", IFNAME, egress),
            make_map("ingress_dispatch", IFNAME, ingress),
        ]
        memo.maps_key = maps_key
    if memo.forward is None:
        memo.forward = forward_chain(c.ct_mark_bit)
    chains.append(memo.forward)
    return Program("inet", c.table, tuple(sets), tuple(memo.maps), tuple(chains))


def _is(a: object, b: object) -> bool:
    return a is b
