"""Flat sets kept across changes (translators/regional.py through
translators/incremental.py): over random seeded models and random chains of ECS
changes (rule added, removed, modified; ENI joins and leaves; inner policy flipped;
a prefix list's entries changed), after every change each kept flat set

- holds pairwise disjoint pieces,
- decides every probed point as the first-match reference (`flatten.decide` over
  the side's rules), probing every piece's and rule's corners and their neighbours,
- covers exactly the region of a cold compile of the same model (cut maybe
  differently), while every other object of the program equals the cold one.

The contract is region equality, not equality: an in-place update splits the
pieces that straddle the changed region. A deliberately broken restriction
(a region that misses one changed box) is caught by the same checks.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Iterator
from typing import Any

import pytest
from nftsg.translators import model as m
from nftsg.translators import regional
from nftsg.translators.actions import Model
from nftsg.translators.compiler import (
    _POLICY_RANK,
    ALL_ADDRS,
    ALL_PORTS,
    ALL_PROTOS,
    _Compiler,
    box_of,
    compile_vpc,
    flat_set_name,
)
from nftsg.translators.errors import EcsError
from nftsg.translators.firstmatch import _overlap
from nftsg.translators.flatten import Box, Ranked, decide
from nftsg.translators.incremental import CompileCache, compile_vpc_cached
from nftsg.translators.network import Network
from nftsg.translators.nft import NftSet, Program, Span
from nftsg.translators.quotas import Quotas
from nftsg.translators.regional import BoxBins, _clip, _volume
from test_compiler import scale_topology

NOW = "2026-12-03T00:00:00Z"
VPC = "vpc-scale"


# ------------------------------------------------------------------ the reference


def side_rules(net: Network) -> dict[str, list[Ranked]]:
    """Flat set name -> the ranked rules of its side (as the compiler pools them)."""
    c = _Compiler(net, VPC, "nftsg", 0x40000000)
    out: dict[str, list[Ranked]] = {}
    for pid, groups in c.profiles().items():
        advanced = any(not g.is_basic for g in groups)
        for direction in ("egress", "ingress"):
            want = "accept" if direction == "ingress" or advanced else "drop"
            for fam in ("ipv4", "ipv6"):
                pooled = {
                    (k, (b.priority, _POLICY_RANK[b.policy]), b.policy == want)
                    for g in groups
                    for b, ks in c.group_keys(g)[direction].items()
                    if b.family == fam
                    for k in ks
                }
                out[flat_set_name(pid, direction, fam)] = [Ranked(*x) for x in sorted(pooled)]
    return out


def _bins(boxes: tuple[Any, ...]) -> BoxBins[Box]:
    bins: BoxBins[Box] = BoxBins()
    for b in boxes:
        bins.add(b, b)
    return bins


def _inside(box: Box, point: tuple[int, ...]) -> bool:
    return all(s.lo <= v <= s.hi for s, v in zip(box, point, strict=True))


def _probes(boxes: list[Box], domain: Box, rnd: random.Random) -> Iterator[tuple[int, ...]]:
    """Every box's low and high corner, each just outside on one field, and a random
    point inside: where a region can change."""
    for box in boxes:
        lo = [s.lo for s in box]
        hi = [s.hi for s in box]
        yield tuple(lo)
        yield tuple(hi)
        yield tuple(rnd.randint(s.lo, s.hi) for s in box)
        f = rnd.randrange(len(box))
        for v, corner in ((box[f].lo - 1, lo), (box[f].hi + 1, hi)):
            if domain[f].lo <= v <= domain[f].hi:
                yield tuple(v if i == f else x for i, x in enumerate(corner))


def check_flat_set(s: NftSet, cold: NftSet, rules: list[Ranked], rnd: random.Random) -> None:
    # The set holds keys in the kernel's field order; the checks reason in boxes.
    pieces = [box_of(e) for e in s.elements]
    cold_pieces = [box_of(e) for e in cold.elements]
    bins = _bins(tuple(pieces))
    for a in pieces:  # pairwise disjoint
        others = [b for b in set(bins.candidates(a)) if b != a and _overlap(a, b)]
        assert not others, (s.name, a, others[:2])
    # Exactly the cold compile's region: the same volume, and each cold piece
    # covered by the kept pieces (both sets are disjoint).
    assert sum(_volume(a) for a in pieces) == sum(_volume(b) for b in cold_pieces), s.name
    for b in cold_pieces:
        covered = sum(_volume(_clip(a, b)) for a in set(bins.candidates(b)) if _overlap(a, b))
        assert covered == _volume(b), (s.name, b)
    fam = "ipv6" if "ipv6_addr" in s.type else "ipv4"
    domain = (ALL_PROTOS, ALL_ADDRS[fam], ALL_PORTS, ALL_PORTS, ALL_ADDRS[fam])
    probe_boxes = [r.box for r in rules] + pieces
    for point in _probes(probe_boxes, domain, rnd):
        held = sum(
            1 for a in set(bins.candidates(tuple(Span(v, v) for v in point))) if _inside(a, point)
        )
        assert held == (1 if decide(rules, point) is True else 0), (s.name, point)


def check_program(got: Program, net: Network, rnd: random.Random) -> None:
    cold = compile_vpc(net, VPC)
    assert got.chains == cold.chains
    assert got.maps == cold.maps
    assert [s.name for s in got.sets] == [s.name for s in cold.sets]
    rules = side_rules(net)
    for s in got.sets:
        c = cold.set_by_name[s.name]
        if s.name in rules:  # a flat set (a side that fell back has bucket sets only)
            check_flat_set(s, c, rules[s.name], rnd)
        else:
            assert s == c, s.name


# ------------------------------------------------------------------ random changes


def _cidr(rnd: random.Random, fam: str, net: Network) -> str:
    addrs = [
        a
        for e in net.enis.values()
        for a in e.addresses
        if a.version == (4 if fam == "ipv4" else 6)
    ]
    if addrs and rnd.random() < 0.6:  # near the members: where rules overlap
        a = rnd.choice(addrs)
        bits = 32 if a.version == 4 else 128
        plen = rnd.choice([bits, bits - 4, bits - 8, bits - 16])
        return str(ipaddress.ip_network(f"{a}/{plen}", strict=False))
    return rnd.choice(
        ["0.0.0.0/0", "10.0.0.0/8", "203.0.113.0/24"]
        if fam == "ipv4"
        else ["::/0", "2001:db8::/32"]
    )


def _permission(rnd: random.Random, net: Network, direction: str, gid: str) -> dict[str, Any]:
    side = "Source" if direction == "ingress" else "Dest"
    proto = rnd.choice(["TCP", "TCP", "UDP", "ICMP", "ALL"])
    p: dict[str, Any] = {
        "IpProtocol": proto,
        "Policy": rnd.choice(["Accept", "Drop"]),
        "Priority": str(rnd.choice([1, 5, 10, 50, 100])),
    }
    if proto in ("TCP", "UDP"):
        lo = rnd.choice([22, 80, 443, 1000, 1001, rnd.randint(1, 65000)])
        p["PortRange"] = f"{lo}/{min(65535, lo + rnd.choice([0, 0, 10, 1000]))}"
    else:
        p["PortRange"] = "-1/-1"
    kind = rnd.random()
    basic = [g.group_id for g in net.groups.values() if g.is_basic and g.group_id != gid]
    if kind < 0.3 and basic and net.groups[gid].is_basic:
        p[f"{side}GroupId"] = rnd.choice(basic)
    elif kind < 0.4 and proto != "ICMP":
        p[f"{side}PrefixListId"] = rnd.choice(sorted(net.prefix_lists))
    elif kind < 0.5 and proto != "ICMP":
        p[f"Ipv6{side}CidrIp"] = _cidr(rnd, "ipv6", net)
    else:
        p[f"{side}CidrIp"] = _cidr(rnd, "ipv4", net)
    return p


def _suffix(direction: str) -> str:
    return "" if direction == "ingress" else "Egress"


def random_change(rnd: random.Random, model: Model) -> Model:
    """One random change (a rejected one retried with another): an ECS call, or a
    prefix list's entries replaced (that comes with a new document, not a call)."""
    net = model.network
    for _ in range(20):
        groups = sorted(net.groups.values(), key=lambda g: g.group_id)
        group = rnd.choice(groups)
        gid = group.group_id
        eni = rnd.choice(sorted(net.enis.values(), key=lambda e: e.eni_id))
        direction = rnd.choice(["ingress", "egress"])
        mine = [r for r in group.rules if r.direction == direction]
        kind = rnd.choice(["add", "add", "remove", "modify", "join", "leave", "policy", "pl"])
        params: dict[str, Any]
        if kind == "add":
            action = "AuthorizeSecurityGroup" + _suffix(direction)
            params = {
                "SecurityGroupId": gid,
                "Permissions": [_permission(rnd, net, direction, gid)],
            }
        elif kind == "remove" and mine:
            action = "RevokeSecurityGroup" + _suffix(direction)
            params = {"SecurityGroupId": gid, "SecurityGroupRuleId": [rnd.choice(mine).rule_id]}
        elif kind == "modify" and mine:
            action = "ModifySecurityGroup" + ("Egress" if direction == "egress" else "") + "Rule"
            params = {"SecurityGroupId": gid, "SecurityGroupRuleId": rnd.choice(mine).rule_id}
            what = rnd.random()
            if what < 0.4:
                params["Priority"] = str(rnd.choice([1, 5, 10, 50, 100]))
            elif what < 0.7:
                params["Policy"] = rnd.choice(["Accept", "Drop"])
            else:
                lo = rnd.randint(1, 65000)
                params.update(IpProtocol="TCP", PortRange=f"{lo}/{lo + rnd.choice([0, 100])}")
        elif kind == "join":
            action = "JoinSecurityGroup"
            params = {"SecurityGroupId": gid, "NetworkInterfaceId": eni.eni_id}
        elif kind == "leave" and len(eni.group_ids) > 1:
            action = "LeaveSecurityGroup"
            params = {
                "SecurityGroupId": rnd.choice(eni.group_ids),
                "NetworkInterfaceId": eni.eni_id,
            }
        elif kind == "policy":
            action = "ModifySecurityGroupPolicy"
            flip = "Drop" if group.inner_access_policy == "Accept" else "Accept"
            params = {"SecurityGroupId": gid, "InnerAccessPolicy": flip}
        elif kind == "pl":
            return _prefix_list_changed(rnd, model)
        else:
            continue
        try:
            new, _ = model.perform(action, params, now=NOW)
        except EcsError:
            continue
        if new is not model:
            return new
    return model


def _prefix_list_changed(rnd: random.Random, model: Model) -> Model:
    net = model.network
    pl = net.prefix_lists[rnd.choice(sorted(net.prefix_lists))]
    entries = list(pl.entries)
    if entries and rnd.random() < 0.5:
        entries.pop(rnd.randrange(len(entries)))
    else:
        if pl.family == "ipv4":
            a = rnd.choice(
                [str(x) for e in net.enis.values() for x in e.addresses if x.version == 4]
            )
            entries.append(ipaddress.ip_network(f"{a}/{rnd.choice([32, 28, 24])}", strict=False))
        else:
            entries.append(ipaddress.ip_network(f"2001:db8:{rnd.randrange(1 << 16):x}::/48"))
    entries = sorted(set(entries), key=lambda n: (n.network_address, n.prefixlen))
    new_pls = {
        **net.prefix_lists,
        pl.prefix_list_id: dataclasses.replace(pl, entries=tuple(entries)),
    }
    new_net = Network(
        net.vpcs, net.groups, net.enis, net.instances, net.externals, new_pls, net.region_id
    )
    return dataclasses.replace(model, network=new_net)


def _load(seed: int) -> Model:
    return Model.load(
        m.topology_from_data(scale_topology(8, 14, 16, seed=seed)),
        Quotas(rules_per_group=1000, rules_per_eni=10000),
    )


def run_chain(seed: int, steps: int) -> int:
    """Random changes on one model, checked after each; returns how many flat sets
    were updated in place (so that the test knows the path it meant was taken)."""
    rnd = random.Random(seed)
    model = _load(seed)
    cache = CompileCache()
    check_program(compile_vpc_cached(model.network, VPC, cache), model.network, rnd)
    patched = 0
    for _ in range(steps):
        model = random_change(rnd, model)
        got = compile_vpc_cached(model.network, VPC, cache)
        patched += cache.patched
        check_program(got, model.network, rnd)
    return patched


@pytest.mark.parametrize("seed", range(5))
def test_kept_flat_sets_decide_as_the_reference_after_random_changes(seed: int) -> None:
    assert run_chain(seed, 20) > 0


def _no_outside(piece: Box, q: Box, out: list[Box], order: Any) -> None:
    """A broken split: the parts of a straddling piece outside q are lost."""


@pytest.mark.parametrize(
    "broken",
    [
        ("incremental", "region_of_change", lambda real: lambda *a, **k: real(*a, **k)[1:]),
        ("regional", "_subtract", lambda real: _no_outside),
    ],
    ids=["region-misses-a-box", "straddling-pieces-not-split"],
)
def test_a_broken_restriction_is_caught(monkeypatch: pytest.MonkeyPatch, broken: Any) -> None:
    import nftsg.translators.incremental as incremental

    module = {"incremental": incremental, "regional": regional}[broken[0]]
    monkeypatch.setattr(module, broken[1], broken[2](getattr(module, broken[1])))
    with pytest.raises(AssertionError, match="f_p"):
        for seed in range(5):
            run_chain(seed, 20)
