"""The nftables compiler: layout (docs/dataplane.md), determinism, escaping, goldens, scale."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from nftsg.translators import naming
from nftsg.translators.compiler import compile_all, compile_vpc, split_parts
from nftsg.translators.errors import EcsError
from nftsg.translators.network import Network
from nftsg.translators.nft import COMMENT_MAX_BYTES, Program, Span
from nftsg.translators.validate import load_network

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
DEMO = ROOT / "examples" / "three-tier.yaml"


def demo_topology() -> dict[str, Any]:
    topo: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    return topo


def network_of(topo: dict[str, Any]) -> Network:
    return load_network(json.dumps(topo))


def dumps(program: Program) -> str:
    return json.dumps(program.to_json(), sort_keys=False)


def commands(program: Program, verb: str, kind: str) -> list[dict[str, Any]]:
    return [c[verb][kind] for c in program.full_sync_commands() if kind in c.get(verb, {})]


def chain_rules(program: Program, chain: str) -> list[dict[str, Any]]:
    return [r for r in commands(program, "add", "rule") if r["chain"] == chain]


@pytest.fixture(scope="module")
def demo() -> tuple[Network, Program]:
    net = load_network(DEMO.read_text())
    return net, compile_vpc(net, "vpc-demo")


# --------------------------------------------------------------------------- layout


def test_full_sync_replaces_the_table_in_one_batch(demo: tuple[Network, Program]) -> None:
    _, prog = demo
    cmds = prog.full_sync_commands()
    table = {"family": "inet", "name": "nftsg"}
    assert cmds[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    assert prog.to_json() == {"nftables": cmds}
    # Every later command is inside the one table.
    for c in cmds[3:]:
        ((_verb, body),) = c.items()
        ((_, obj),) = body.items()
        assert (obj["family"], obj["table"]) == ("inet", "nftsg")


def test_forward_chain_is_the_documented_dispatch(demo: tuple[Network, Program]) -> None:
    _, prog = demo
    fwd = next(c for c in commands(prog, "add", "chain") if c["name"] == "forward")
    assert (fwd["type"], fwd["hook"], fwd["prio"], fwd["policy"]) == (
        "filter",
        "forward",
        0,
        "drop",
    )
    exprs = [r["expr"] for r in chain_rules(prog, "forward")]
    assert len(exprs) == 7
    for fam, l3, n in (("ipv4", "ip", "v4"), ("ipv6", "ip6", "v6")):
        rule = exprs.pop(0)
        assert rule == [
            {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": fam}},
            {
                "match": {
                    "op": "!=",
                    "left": {
                        "concat": [
                            {"meta": {"key": "iifname"}},
                            {"payload": {"protocol": l3, "field": "saddr"}},
                        ]
                    },
                    "right": f"@port_addrs_{n}",
                }
            },
            {"drop": None},
        ]
    assert exprs[0] == [
        {
            "vmap": {
                "key": {"ct": {"key": "state"}},
                "data": {
                    "set": [
                        ["invalid", {"drop": None}],
                        ["established", {"accept": None}],
                        ["related", {"accept": None}],
                    ]
                },
            }
        }
    ]
    assert exprs[1] == [{"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@intra_dispatch"}}]
    assert exprs[2:] == [
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@eni_ports"}},
            {"jump": {"target": "egress"}},
        ],
        [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@eni_ports"}},
            {"jump": {"target": "ingress"}},
        ],
        [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@ports"}},
            {"accept": None},
        ],
    ]


def test_port_ids_and_port_sets(demo: tuple[Network, Program]) -> None:
    net, prog = demo
    enis = net.enis_in_vpc("vpc-demo")
    ext = net.externals_in_vpc("vpc-demo")
    port_ids = prog.map_by_name["port_ids"]
    assert port_ids.data == "mark"
    assert dict(port_ids.elements) == {(e.ifname,): e.port_id for e in enis}
    assert len({e.port_id for e in enis}) == len(enis) and 0 not in {e.port_id for e in enis}
    maps = {m["name"]: m for m in commands(prog, "add", "map")}
    assert (maps["port_ids"]["type"], maps["port_ids"]["map"]) == ("ifname", "mark")
    assert sorted(maps["port_ids"]["elem"]) == sorted([e.ifname, e.port_id] for e in enis)
    # External hosts are ports (anti-spoofing, final accept) but not evaluated.
    assert {k[0] for k in prog.set_by_name["eni_ports"].elements} == {e.ifname for e in enis}
    assert {k[0] for k in prog.set_by_name["ports"].elements} == {p.ifname for p in (*enis, *ext)}
    assert prog.set_by_name["advanced_ports"].elements == ()
    v4 = prog.set_by_name["port_addrs_v4"].elements
    office = int(ipaddress.ip_address("198.51.100.7"))
    assert (net.externals["office"].ifname, Span(office, office)) in v4
    web1 = net.enis["eni-web1"]
    six = int(ipaddress.ip_address("2001:db8:10:1::10"))
    assert prog.set_by_name["port_addrs_v6"].elements.count((web1.ifname, Span(six, six))) == 1


def test_port_id_is_stable_nonzero_and_collisions_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert naming.port_id("eni-web1") == naming.port_id("eni-web1") != 0
    assert 0 < naming.port_id("eni-x") < 1 << 32
    monkeypatch.setattr(naming, "port_id", lambda eni_id: 7)
    with pytest.raises(EcsError, match="map to one port id"):
        network_of(demo_topology())


def test_advanced_ports_hold_enis_of_advanced_groups() -> None:
    net = load_network((GOLDEN / "advanced.yaml").read_text())
    for vpc_id in net.vpcs:
        prog = compile_vpc(net, vpc_id)
        advanced = {
            (e.ifname,) for e in net.enis_in_vpc(vpc_id) if not net.groups[e.group_ids[0]].is_basic
        }
        assert set(prog.set_by_name["advanced_ports"].elements) == advanced


def test_intra_group_objects_only_for_basic_accept_groups(demo: tuple[Network, Program]) -> None:
    net, prog = demo
    # sg-app and sg-db are Drop: no set, and their members get no intra chain.
    assert {s.name for s in prog.sets if s.name.startswith("intra_")} == {
        "intra_sg-web",
        "intra_sg-bastion",
    }
    assert {k[0] for k in prog.set_by_name["intra_sg-web"].elements} == {
        net.enis["eni-web1"].ifname,
        net.enis["eni-web2"].ifname,
    }
    intra = dict(prog.map_by_name["intra_dispatch"].elements)
    assert set(intra) == {(net.enis[e].ifname,) for e in ("eni-web1", "eni-web2", "eni-bastion")}
    assert chain_rules(prog, "intra_eni-web1")[0]["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@intra_sg-web"}},
        {"accept": None},
    ]


def _lookup_sets(rules: list[dict[str, Any]]) -> list[str]:
    """The rule sets a rule chain looks up, in order (first rule: the mark; last: default)."""
    return [r["expr"][-2]["match"]["right"][1:] for r in rules[1:-1]]


def _set_mark(port: str) -> dict[str, Any]:
    return {
        "mangle": {
            "key": {"meta": {"key": "mark"}},
            "value": {"map": {"key": {"meta": {"key": port}}, "data": "@port_ids"}},
        }
    }


def test_rule_chains_are_vpc_wide_buckets_priority_then_drop_first(
    demo: tuple[Network, Program],
) -> None:
    _, prog = demo
    ingress = chain_rules(prog, "ingress")
    assert ingress[0]["expr"] == [_set_mark("oifname")]
    assert _lookup_sets(ingress) == [
        "ingress_p1_a_v4_tcp_0",
        "ingress_p1_a_v4_udp_0",
        "ingress_p1_a_v6_tcp_0",
        "ingress_p1_a_v6_udp_0",
        "ingress_p2_d_v4_tcp_0",
        "ingress_p10_a_v4_tcp_0",
        "ingress_p10_a_v6_tcp_0",
        "ingress_p50_a_v4_icmp_0",
    ]
    verdicts = [r["expr"][-1] for r in ingress[1:]]
    assert verdicts == [{"return": None}] * 4 + [{"drop": None}] + [{"return": None}] * 3 + [
        {"drop": None}
    ]
    # Family, then protocol, then the lookup; ingress reads the peer from saddr and
    # the local address from daddr, after the port id in the mark.
    assert ingress[1]["expr"][:3] == [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": 6}},
        {
            "match": {
                "op": "==",
                "left": {
                    "concat": [
                        {"meta": {"key": "mark"}},
                        {"payload": {"protocol": "ip", "field": "saddr"}},
                        {"payload": {"protocol": "th", "field": "dport"}},
                        {"payload": {"protocol": "th", "field": "sport"}},
                        {"payload": {"protocol": "ip", "field": "daddr"}},
                    ]
                },
                "right": "@ingress_p1_a_v4_tcp_0",
            }
        },
    ]
    assert ingress[-1]["expr"] == [{"drop": None}]
    egress = chain_rules(prog, "egress")
    assert egress[0]["expr"] == [_set_mark("iifname")]
    assert _lookup_sets(egress) == ["egress_p100_d_v4_all_0", "egress_p100_d_v6_all_0"]
    # ALL: no protocol match; egress reads the peer from daddr.
    assert [e for e in egress[1]["expr"] if "l4proto" in json.dumps(e)] == []
    assert egress[1]["expr"][1]["match"]["left"]["concat"] == [
        {"meta": {"key": "mark"}},
        {"payload": {"protocol": "ip", "field": "daddr"}},
        {"payload": {"protocol": "ip", "field": "saddr"}},
    ]
    # Advanced egress drops by default; basic egress falls off the end (returns).
    assert egress[-1]["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@advanced_ports"}},
        {"drop": None},
    ]


def test_drop_bucket_precedes_accept_bucket_of_same_priority() -> None:
    topo = demo_topology()
    topo["security_groups"][3]["permissions"][1]["priority"] = 1  # bastion's drop 22 -> prio 1
    prog = compile_vpc(network_of(topo), "vpc-demo")
    assert _lookup_sets(chain_rules(prog, "ingress"))[:2] == [
        "ingress_p1_d_v4_tcp_0",
        "ingress_p1_a_v4_tcp_0",
    ]


def test_set_elements_expand_cidrs_members_and_prefix_lists(
    demo: tuple[Network, Program],
) -> None:
    net, prog = demo
    pid = {e: net.enis[e].port_id for e in net.enis}
    sets = {s["name"]: s for s in commands(prog, "add", "set")}
    assert sets["ingress_p1_a_v4_tcp_0"]["type"] == [
        "mark",
        "ipv4_addr",
        "inet_service",
        "inet_service",
        "ipv4_addr",
    ]
    assert sets["ingress_p1_a_v4_tcp_0"]["flags"] == ["interval"]
    any_v4 = {"prefix": {"addr": "0.0.0.0", "len": 0}}
    full = {"range": [0, 65535]}
    elems = sets["ingress_p1_a_v4_tcp_0"]["elem"]
    # ssh from sg-bastion (web, app, db): the bastion's live address, keyed by port id.
    for eni in ("eni-web1", "eni-web2", "eni-app1", "eni-db1"):
        assert {"concat": [pid[eni], "10.0.9.10", 22, full, any_v4]} in elems
    # app 8080 from sg-web's members; the bastion's ssh from the office prefix list.
    assert {"concat": [pid["eni-app1"], "10.0.1.11", 8080, full, any_v4]} in elems
    office = {"prefix": {"addr": "198.51.100.0", "len": 24}}
    assert {"concat": [pid["eni-bastion"], office, 22, full, any_v4]} in elems
    assert len(elems) == 8
    # The bastion has no IPv6 address: no IPv6 ssh element (app's 8080 from web, db's
    # 5432 from app remain).
    v6 = sets["ingress_p1_a_v6_tcp_0"]["elem"]
    assert {(e["concat"][0], e["concat"][2]) for e in v6} == {
        (pid["eni-app1"], 8080),
        (pid["eni-db1"], 5432),
    }
    # ICMP from the office prefix list: IPv4 only, every type: no port fields at all.
    assert sets["ingress_p50_a_v4_icmp_0"]["type"] == ["mark", "ipv4_addr", "ipv4_addr"]
    assert sets["ingress_p50_a_v4_icmp_0"]["elem"] == [
        {"concat": [p, office, any_v4]} for p in sorted((pid["eni-web1"], pid["eni-web2"]))
    ]
    assert not any(n.startswith("ingress_p50_a_v6") for n in sets)
    # ALL drop on egress: every protocol (no l4proto match), every address.
    any_v6 = {"prefix": {"addr": "::", "len": 0}}
    assert sets["egress_p100_d_v6_all_0"]["elem"] == [{"concat": [pid["eni-db1"], any_v6, any_v6]}]


def test_rule_comments_are_static_and_within_the_limit(demo: tuple[Network, Program]) -> None:
    _, prog = demo
    comments = [r.comment for c in prog.chains for r in c.rules]
    assert all(len(c.encode()) <= COMMENT_MAX_BYTES for c in comments)
    ingress = [r.comment for r in prog.chain_by_name["ingress"].rules]
    assert ingress[1] == "p1 accept ipv4 tcp part 0" and ingress[-1] == "default ingress"
    # A rule change inside a bucket changes elements, never a comment.
    topo = demo_topology()
    topo["security_groups"][0]["permissions"].append(
        {
            "direction": "ingress",
            "ip_protocol": "TCP",
            "port_range": "2000/2000",
            "source_cidr_ip": "0.0.0.0/0",
            "priority": 10,
        }
    )
    again = compile_vpc(network_of(topo), "vpc-demo")
    assert again.chains == prog.chains


HOSTILE = '"}]}; flush ruleset\n'


def test_user_text_never_reaches_the_program() -> None:
    topo = demo_topology()
    for g in topo["security_groups"]:
        g["security_group_name"] = HOSTILE
        g["description"] = HOSTILE
        g["tags"] = {"k": HOSTILE}
        for p in g.get("permissions", []):
            p["description"] = HOSTILE
    for i in topo["instances"]:
        i["instance_name"] = HOSTILE
    out = dumps(compile_vpc(network_of(topo), "vpc-demo"))
    assert "flush" not in out and "ruleset" not in out
    assert out == dumps(compile_vpc(load_network(DEMO.read_text()), "vpc-demo"))
    # Every comment is made of id characters only.
    for c in json.loads(out)["nftables"]:
        body = next(iter(next(iter(c.values())).values()))
        if "comment" in body:
            assert re.fullmatch(r"[A-Za-z0-9_.:/+=# -]{1,128}", body["comment"])


# --------------------------------------------------------------------------- determinism


def _shuffled(topo: dict[str, Any], seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    t = copy.deepcopy(topo)
    for key in ("security_groups", "instances", "prefix_lists", "external_hosts"):
        rnd.shuffle(t.get(key, []))
    for g in t["security_groups"]:
        rnd.shuffle(g.get("permissions", []))
        ids = g.get("security_group_ids")
        if ids:
            rnd.shuffle(ids)
    for i in t["instances"]:
        if i.get("security_group_ids"):
            rnd.shuffle(i["security_group_ids"])
    return t


@pytest.mark.parametrize("source", ["demo", "mixed", "scale"])
def test_same_model_in_any_order_gives_identical_bytes(source: str) -> None:
    if source == "demo":
        topo = demo_topology()
    elif source == "mixed":
        topo = yaml.safe_load((GOLDEN / "mixed.yaml").read_text())
    else:
        topo = scale_topology(n_groups=30, n_enis=40, rules_per_group=60, seed=3)
    reference = {v: dumps(p) for v, p in compile_all(network_of(topo)).items()}
    for seed in range(3):
        again = {v: dumps(p) for v, p in compile_all(network_of(_shuffled(topo, seed))).items()}
        assert again == reference


# --------------------------------------------------------------------------- parts

_spans = st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda t: Span(min(t), max(t)))
_cidrs = st.tuples(st.integers(0, 255), st.integers(0, 8)).map(
    lambda t: Span((t[0] >> t[1]) << t[1], ((t[0] >> t[1]) << t[1]) + (1 << t[1]) - 1)
)
_keys = st.tuples(_spans, _cidrs, _spans, _spans, _cidrs)


def _overlap(a: tuple[Span, ...], b: tuple[Span, ...]) -> bool:
    return all(x.lo <= y.hi and y.lo <= x.hi for x, y in zip(a, b, strict=True))


def _covered(keys: list[tuple[Span, ...]], point: tuple[int, ...]) -> bool:
    return any(all(s.lo <= p <= s.hi for s, p in zip(k, point, strict=True)) for k in keys)


@settings(max_examples=150, deadline=None)
@given(st.lists(_keys, max_size=25), st.lists(st.tuples(*[st.integers(0, 255)] * 5), max_size=40))
def test_parts_never_overlap_and_match_the_same_packets(
    keys: list[tuple[Span, Span, Span, Span, Span]], points: list[tuple[int, ...]]
) -> None:
    parts = split_parts(keys)
    flat = [k for p in parts for k in p]
    assert len(flat) == len(set(flat))
    for part in parts:
        for i, a in enumerate(part):
            for b in part[i + 1 :]:
                assert not _overlap(a, b)
    # Greedy: an element sits in part k only because every earlier part holds an overlap.
    for k, part in enumerate(parts):
        for e in part:
            for earlier in parts[:k]:
                assert any(_overlap(e, o) for o in earlier)
    corners = [tuple(s.lo for s in k) for k in keys] + [tuple(s.hi for s in k) for k in keys]
    for point in [*points, *corners]:
        assert _covered(flat, point) == _covered(list(keys), point)


# --------------------------------------------------------------------------- goldens

GOLDEN_MODELS = {
    "three-tier": DEMO,
    "advanced": GOLDEN / "advanced.yaml",
    "mixed": GOLDEN / "mixed.yaml",
    "default-group": GOLDEN / "default-group.yaml",
}


def golden_text(source: Path) -> str:
    programs = compile_all(load_network(source.read_text()))
    return json.dumps({v: p.to_json() for v, p in programs.items()}, indent=1) + "\n"


@pytest.mark.parametrize("name", sorted(GOLDEN_MODELS))
def test_golden(name: str) -> None:
    """Byte-for-byte; regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_compiler.py``."""
    path = GOLDEN / f"{name}.json"
    text = golden_text(GOLDEN_MODELS[name])
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.read_text() == text


def test_golden_models_cover_the_rare_constructs() -> None:
    mixed = json.loads((GOLDEN / "mixed.json").read_text())["vpc-mix"]["nftables"]
    text = json.dumps(mixed)
    names = {c["add"]["set"]["name"] for c in mixed if "set" in c.get("add", {})}
    assert any("_v6_icmpv6_" in n for n in names) and '"right": 58}' in text  # ICMPv6
    assert any("_gre_" in n for n in names) and '"right": 47}' in text  # GRE
    assert '"2001:db8:ff::", "len": 48' in text  # IPv6 prefix list
    # A local address (dest_cidr_ip on ingress) is the last field.
    assert '{"range": [8000, 8100]}, {"range": [0, 65535]}, "10.2.1.11"]' in text
    # Source ports are the fourth field.
    assert '53, {"range": [1024, 65535]}' in text
    # A secondary ENI is enforced on its own: its own port id.
    net = load_network((GOLDEN / "mixed.yaml").read_text())
    front_b = net.enis["eni-front-b"]
    assert f"[{front_b.port_id}, " in text
    port_ids = next(
        c["add"]["map"]
        for c in mixed
        if "map" in c.get("add", {}) and c["add"]["map"]["name"] == "port_ids"
    )
    assert [front_b.ifname, front_b.port_id] in port_ids["elem"]
    adv = json.loads((GOLDEN / "advanced.json").read_text())["vpc-adv"]["nftables"]
    assert not any("intra_" in json.dumps(c) and "dispatch" not in json.dumps(c) for c in adv)
    default = json.loads((GOLDEN / "default-group.json").read_text())["vpc-plain"]["nftables"]
    assert any(
        c.get("add", {}).get("set", {}).get("name") == "intra_sg-default-plain" for c in default
    )


# --------------------------------------------------------------------------- scale


def scale_topology(
    n_groups: int = 200, n_enis: int = 200, rules_per_group: int = 200, seed: int = 7
) -> dict[str, Any]:
    """A VPC at ECS's default limits: `n_groups` groups of `rules_per_group` rules
    (CIDR, up to 20 group references, prefix lists; priorities from a realistic
    small set; both policies), ENIs in 1..3 basic groups or one advanced group."""
    rnd = random.Random(seed)
    prios = [1, 5, 10, 50, 100]
    pls = [
        {
            "prefix_list_id": f"pl-{i}",
            "address_family": "IPv4" if i % 2 == 0 else "IPv6",
            "max_entries": 4,
            "entries": [f"198.51.{i}.{j * 16}/28" for j in range(3)]
            if i % 2 == 0
            else [f"2001:db8:{i:x}:{j}::/64" for j in range(3)],
        }
        for i in range(10)
    ]
    n_adv = max(1, n_groups // 10)
    basic = [f"sg-{i:03d}" for i in range(n_groups - n_adv)]
    adv = [f"sg-{i:03d}" for i in range(n_groups - n_adv, n_groups)]
    groups = []
    for gid in basic + adv:
        is_basic = gid in basic
        perms: list[dict[str, Any]] = []
        seen: set[str] = set()
        weight = n = refs = 0
        while weight < rules_per_group:
            n += 1
            direction = rnd.choice(["ingress", "egress"])
            side = "source" if direction == "ingress" else "dest"
            p: dict[str, Any] = {
                "direction": direction,
                "priority": rnd.choice(prios),
                "policy": "drop" if rnd.random() < 0.25 else "accept",
            }
            kind = rnd.random()
            port = 1000 + n
            cost = 1
            if is_basic and refs < 20 and kind < 0.15:
                refs += 1
                p[f"{side}_group_id"] = rnd.choice([b for b in basic if b != gid])
                p.update(ip_protocol="TCP", port_range=f"{port}/{port}")
            elif kind < 0.2:
                cost = 4
                if weight + cost > rules_per_group:
                    continue
                p[f"{side}_prefix_list_id"] = rnd.choice(pls)["prefix_list_id"]
                p.update(ip_protocol="UDP", port_range=f"{port}/{port + 10}")
            else:
                proto = rnd.choice(["TCP", "TCP", "TCP", "UDP", "ICMP", "ALL", "GRE"])
                if rnd.random() < 0.2:
                    p[f"ipv6_{side}_cidr_ip"] = rnd.choice(["::/0", f"2001:db8:{n:x}::/48"])
                    proto = "ICMPv6" if proto == "ICMP" else proto
                else:
                    p[f"{side}_cidr_ip"] = rnd.choice(
                        [
                            "0.0.0.0/0",
                            f"10.{n % 256}.0.0/16",
                            f"192.168.{n % 256}.0/24",
                            f"172.16.{n % 256}.{rnd.randrange(256)}/32",
                        ]
                    )
                if proto in ("TCP", "UDP"):
                    lo = rnd.choice([port, 1, 1024, 8000 + n])
                    hi = lo if rnd.random() < 0.7 else min(65535, lo + rnd.randrange(1, 2000))
                    p["port_range"] = f"{lo}/{hi}"
                    if rnd.random() < 0.1:
                        p["source_port_range"] = "1024/65535"
                else:
                    p["port_range"] = "-1/-1"
                p["ip_protocol"] = proto
            ident = json.dumps(p, sort_keys=True)
            if ident in seen:
                continue
            seen.add(ident)
            p["description"] = f"{HOSTILE} {n}"
            perms.append(p)
            weight += cost
        groups.append(
            {
                "security_group_id": gid,
                "vpc_id": "vpc-scale",
                "security_group_type": "normal" if is_basic else "enterprise",
                "inner_access_policy": rnd.choice(["Accept", "Drop"]) if is_basic else "Drop",
                "permissions": perms,
            }
        )
    instances = []
    for i in range(n_enis):
        gids = [adv[i % n_adv]] if i % 10 == 9 else rnd.sample(basic, rnd.randint(1, 3))
        inst: dict[str, Any] = {
            "instance_id": f"i-{i:04d}",
            "vswitch_id": "vsw-a",
            "private_ip_address": f"10.0.{i // 200}.{i % 200 + 10}",
            "security_group_ids": gids,
        }
        if i % 2 == 0:
            inst["ipv6_address"] = f"2001:db8:1:1::{i + 16:x}"
        instances.append(inst)
    return {
        "vpcs": [
            {
                "vpc_id": "vpc-scale",
                "cidr_block": "10.0.0.0/16",
                "ipv6_cidr_block": "2001:db8:1::/56",
                "vswitches": [
                    {
                        "vswitch_id": "vsw-a",
                        "cidr_block": "10.0.0.0/20",
                        "ipv6_cidr_block": "2001:db8:1:1::/64",
                    }
                ],
            }
        ],
        "prefix_lists": pls,
        "security_groups": groups,
        "instances": instances,
        "external_hosts": [
            {"name": "internet", "vpc_id": "vpc-scale", "ip_address": "203.0.113.5"}
        ],
    }


@pytest.fixture(scope="session")
def scale_network() -> Network:
    return network_of(scale_topology())


def test_scale_compiles_fast_with_cost_independent_of_rule_count(scale_network: Network) -> None:
    net = scale_network
    n_rules = sum(len(g.rules) for g in net.groups.values())
    times, render = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        prog = compile_vpc(net, "vpc-scale")
        t1 = time.perf_counter()
        text = json.dumps(prog.to_json())
        times.append(t1 - t0)
        render.append(time.perf_counter() - t1)
    sets = [s for s in prog.sets if s.name.startswith(("egress_", "ingress_"))]
    print(
        f"\nscale: {len(net.enis)} ENIs, {n_rules} rules -> {len(prog.chains)} chains, "
        f"{sum(len(c.rules) for c in prog.chains)} rules, {len(prog.sets)} sets "
        f"({len(sets)} rule sets), {prog.element_count()} elements, "
        f"{len(text) / 1e6:.1f} MB JSON; compile best {min(times):.3f}s, "
        f"render best {min(render):.3f}s"
    )
    assert min(times) < 1.0
    # The rule sets are VPC-wide: their number depends on the distinct (priority,
    # policy, family, protocol class) of the VPC's rules, not on the ENIs.
    pairs = {(r.priority, r.policy) for g in net.groups.values() for r in g.rules}
    parts = max(int(s.name.rsplit("_", 1)[1]) for s in sets) + 1
    assert len(sets) <= 2 * len(pairs) * 2 * 6 * parts
    assert not any(c.name.startswith(("in_", "out_")) for c in prog.chains)
    # Per-packet cost: a TCP/IPv4 packet is looked up only in the tcp and all sets
    # of ipv4: at most (distinct priority/policy pairs) x 2 x parts per direction.
    for direction in ("egress", "ingress"):
        chain = prog.chain_by_name[direction]
        assert len(chain.rules) == len([s for s in sets if s.name.startswith(direction)]) + 2
        tcp4 = [r for r in chain.rules if "ipv4 tcp" in r.comment or "ipv4 all" in r.comment]
        pooled = sum(1 for g in net.groups.values() for r in g.rules if r.direction == direction)
        print(f"scale: {direction}: {pooled} rules, a TCP/IPv4 packet does {len(tcp4)} lookups")
        assert len(tcp4) <= len(pairs) * 2 * parts
        assert len(tcp4) * 20 < pooled
