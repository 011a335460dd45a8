"""The nftables compiler: layout (docs/dataplane.md), determinism, escaping, goldens, scale."""

from __future__ import annotations

import copy
import dataclasses
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
from nftsg.translators.compiler import (
    DEFAULT_CT_MARK_BIT,
    KEY_ORDER,
    RULE_SET_TYPE,
    box_of,
    check_ct_mark_bit,
    compile_all,
    compile_vpc,
    forward_chain,
    key_of,
    profile_id,
    split_parts,
)
from nftsg.translators.network import Network
from nftsg.translators.nft import COMMENT_MAX_BYTES, Match, Program, SetRef, Span, Verdict
from nftsg.translators.tracer import Packet, Ruleset
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


@pytest.fixture(scope="module")
def demo_v4() -> tuple[Network, Program]:
    """The v4 layout (per-group bucket sets, per-ENI chains), kept as a compiler option."""
    net = load_network(DEMO.read_text())
    return net, compile_vpc(net, "vpc-demo", layout="v4")


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
    assert len(exprs) == 8
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
    # Flows the agent marked as denied by the current model drop in both directions;
    # the rule reads only the agent's bit of the mark.
    bit = DEFAULT_CT_MARK_BIT
    assert exprs.pop(0) == [
        {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, bit]}, "right": bit}},
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
    assert exprs[1:4] == [
        [{"vmap": {"key": {"meta": {"key": port}}, "data": f"@{data}"}}]
        for port, data in (
            ("oifname", "intra_dispatch"),
            ("iifname", "egress_dispatch"),
            ("oifname", "ingress_dispatch"),
        )
    ]
    assert exprs[4] == [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@ports"}},
        {"accept": None},
    ]


def test_dispatch_maps_and_port_sets(demo: tuple[Network, Program]) -> None:
    net, prog = demo
    enis = net.enis_in_vpc("vpc-demo")
    ext = net.externals_in_vpc("vpc-demo")
    eg = dict(prog.map_by_name["egress_dispatch"].elements)
    ing = dict(prog.map_by_name["ingress_dispatch"].elements)
    assert set(eg) == set(ing) == {(e.ifname,) for e in enis}
    for e in enis:
        # ENIs with the same group list share one pair of rule chains.
        assert eg[(e.ifname,)].target == f"out_{profile_id(e.group_ids)}"
        assert ing[(e.ifname,)].target == f"in_{profile_id(e.group_ids)}"
    # External hosts are ports (anti-spoofing, final accept) but not dispatched.
    assert {k[0] for k in prog.set_by_name["ports"].elements} == {p.ifname for p in (*enis, *ext)}
    v4 = prog.set_by_name["port_addrs_v4"].elements
    office = int(ipaddress.ip_address("198.51.100.7"))
    assert (net.externals["office"].ifname, Span(office, office)) in v4
    web1 = net.enis["eni-web1"]
    six = int(ipaddress.ip_address("2001:db8:10:1::10"))
    assert prog.set_by_name["port_addrs_v6"].elements.count((web1.ifname, Span(six, six))) == 1
    # No packet mark, no VPC-wide rule chain.
    assert not {"egress", "ingress"} & set(prog.chain_by_name)
    assert '"meta": {"key": "mark"}' not in dumps(prog)


def test_default_verdicts_basic_and_advanced() -> None:
    net = load_network((GOLDEN / "advanced.yaml").read_text())
    for vpc_id in net.vpcs:
        prog = compile_vpc(net, vpc_id)
        for eni in net.enis_in_vpc(vpc_id):
            advanced = not net.groups[eni.group_ids[0]].is_basic
            pid = profile_id(eni.group_ids)
            out = prog.chain_by_name[f"out_{pid}"].rules[-1]
            into = prog.chain_by_name[f"in_{pid}"].rules[-1]
            assert out.statements == (Verdict("drop" if advanced else "return"),)
            assert into.statements == (Verdict("drop"),)
            kind = "advanced" if advanced else "basic"
            assert out.comment == f"default egress {kind}"


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
    """The group rule sets a rule chain looks up, in order (last rule: the default)."""
    return [r["expr"][-2]["match"]["right"][1:] for r in rules[:-1]]


def _payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


NFPROTO4 = {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}}
L4 = {"meta": {"key": "l4proto"}}


def K(proto: Any, peer: Any, dport: Any, sport: Any, local: Any) -> list[Any]:
    """Fields given in the model's order, as the kernel key orders them (KEY_ORDER)."""
    box = (proto, peer, dport, sport, local)
    return [box[i] for i in KEY_ORDER]


def test_v4_rule_chains_are_per_eni_buckets_priority_then_drop_first(
    demo_v4: tuple[Network, Program],
) -> None:
    _, prog = demo_v4
    web = chain_rules(prog, "in_eni-web1")
    # Per bucket (priority, policy, family), one lookup per group of the ENI that has
    # the bucket and per part; the sets are the group's, shared by all its members.
    assert _lookup_sets(web) == [
        "g_sg-web_in_p1_a_v4_0",
        "g_sg-web_in_p1_a_v6_0",
        "g_sg-web_in_p10_a_v4_0",
        "g_sg-web_in_p10_a_v6_0",
        "g_sg-web_in_p50_a_v4_0",
    ]
    assert _lookup_sets(chain_rules(prog, "in_eni-web2")) == _lookup_sets(web)
    assert [r["expr"][-1] for r in web] == [{"return": None}] * 5 + [{"drop": None}]
    bastion = chain_rules(prog, "in_eni-bastion")
    assert _lookup_sets(bastion) == ["g_sg-bastion_in_p1_a_v4_0", "g_sg-bastion_in_p2_d_v4_0"]
    assert [r["expr"][-1] for r in bastion] == [{"return": None}] + [{"drop": None}] * 2
    # Every lookup: family, then one five-field concatenation; ingress reads the peer
    # from saddr and the local address from daddr. A group reference is no different
    # from a CIDR: its members' addresses are elements of the referencing group's set.
    for rule, name in zip(web[:-1], _lookup_sets(web), strict=True):
        fam, nfproto = ("ip", "ipv4") if name.endswith("_v4_0") else ("ip6", "ipv6")
        assert rule["expr"] == [
            {"match": {**NFPROTO4["match"], "right": nfproto}},
            {
                "match": {
                    "op": "==",
                    "left": {
                        "concat": K(
                            L4,
                            _payload(fam, "saddr"),
                            _payload("th", "dport"),
                            _payload("th", "sport"),
                            _payload(fam, "daddr"),
                        )
                    },
                    "right": "@" + name,
                }
            },
            {"return": None},
        ]
    # Egress reads the peer from daddr and the local address from saddr; basic egress
    # returns by default.
    db = chain_rules(prog, "out_eni-db1")
    assert _lookup_sets(db) == ["g_sg-db_out_p100_d_v4_0", "g_sg-db_out_p100_d_v6_0"]
    assert db[0]["expr"][1]["match"]["left"]["concat"] == K(
        L4,
        _payload("ip", "daddr"),
        _payload("th", "dport"),
        _payload("th", "sport"),
        _payload("ip", "saddr"),
    )
    assert db[-1]["expr"] == [{"return": None}]
    assert chain_rules(prog, "out_eni-web1") == [
        {
            "family": "inet",
            "table": "nftsg",
            "chain": "out_eni-web1",
            "comment": "default egress basic eni-web1",
            "expr": [{"return": None}],
        }
    ]


def test_v4_buckets_of_several_groups_interleave_by_bucket_then_group() -> None:
    """An ENI in two groups: buckets in order, and within a bucket one lookup per group
    having it (sorted by id); a group without the bucket has no lookup there."""
    topo = demo_topology()
    app = next(i for i in topo["instances"] if i["instance_id"] == "i-app1")
    app["security_group_ids"] = ["sg-web", "sg-app"]
    prog = compile_vpc(network_of(topo), "vpc-demo", layout="v4")
    assert _lookup_sets(chain_rules(prog, "in_eni-app1")) == [
        "g_sg-app_in_p1_a_v4_0",
        "g_sg-web_in_p1_a_v4_0",
        "g_sg-app_in_p1_a_v6_0",
        "g_sg-web_in_p1_a_v6_0",
        "g_sg-web_in_p10_a_v4_0",
        "g_sg-web_in_p10_a_v6_0",
        "g_sg-web_in_p50_a_v4_0",
    ]
    assert "g_sg-app_in_p10_a_v4_0" not in prog.set_by_name


def test_v4_drop_bucket_precedes_accept_bucket_of_same_priority() -> None:
    topo = demo_topology()
    topo["security_groups"][3]["permissions"][1]["priority"] = 1  # bastion's drop 22 -> prio 1
    prog = compile_vpc(network_of(topo), "vpc-demo", layout="v4")
    assert _lookup_sets(chain_rules(prog, "in_eni-bastion")) == [
        "g_sg-bastion_in_p1_d_v4_0",
        "g_sg-bastion_in_p1_a_v4_0",
    ]


def test_v4_group_sets_hold_cidrs_members_and_prefix_list_entries(
    demo_v4: tuple[Network, Program],
) -> None:
    _, prog = demo_v4
    sets = {s["name"]: s for s in commands(prog, "add", "set")}
    any_v4 = {"prefix": {"addr": "0.0.0.0", "len": 0}}
    full = {"range": [0, 65535]}
    # Only group sets, anti-spoofing, ports and intra sets: no per-ENI rule set, no
    # VPC-wide member or prefix-list set.
    assert {n for n in sets if not n.startswith("g_")} == {
        "ports",
        "port_addrs_v4",
        "port_addrs_v6",
        "intra_sg-web",
        "intra_sg-bastion",
    }
    # CIDR rules: five fields, interval.
    assert sets["g_sg-web_in_p10_a_v4_0"]["type"] == K(
        "inet_proto",
        "ipv4_addr",
        "inet_service",
        "inet_service",
        "ipv4_addr",
    )
    assert sets["g_sg-web_in_p10_a_v4_0"]["flags"] == ["interval"]
    assert sets["g_sg-web_in_p10_a_v4_0"]["elem"] == [
        {"concat": K(6, any_v4, 80, full, any_v4)},
        {"concat": K(6, any_v4, 443, full, any_v4)},
    ]
    # Group references: one element per live member address of the referenced group
    # (/32, /128), in both families.
    assert sets["g_sg-app_in_p1_a_v4_0"]["elem"] == [
        {"concat": K(6, "10.0.1.10", 8080, full, any_v4)},
        {"concat": K(6, "10.0.1.11", 8080, full, any_v4)},
        {"concat": K(6, "10.0.9.10", 22, full, any_v4)},
        {"concat": K(17, "10.0.1.10", 5353, full, any_v4)},
        {"concat": K(17, "10.0.1.11", 5353, full, any_v4)},
    ]
    assert len(sets["g_sg-app_in_p1_a_v6_0"]["elem"]) == 4  # the bastion has no IPv6 address
    # A bucket whose references have no member address of a family keeps an empty set,
    # so that the first member's address is an element.
    assert "elem" not in sets["g_sg-web_in_p1_a_v6_0"]
    # Prefix lists: their entries (ICMP from the office: IPv4 only, every type: full
    # port fields).
    office = {"prefix": {"addr": "198.51.100.0", "len": 24}}
    assert sets["g_sg-web_in_p50_a_v4_0"]["elem"] == [{"concat": K(1, office, full, full, any_v4)}]
    assert not any(n.startswith("g_sg-web_in_p50_a_v6") for n in sets)
    # ALL drop on egress: every protocol, every address.
    any_v6 = {"prefix": {"addr": "::", "len": 0}}
    assert sets["g_sg-db_out_p100_d_v6_0"]["elem"] == [
        {"concat": K({"range": [0, 255]}, any_v6, full, full, any_v6)}
    ]
    for body in sets.values():
        if body["name"].startswith("g_"):
            assert len(body["type"]) == 5


def test_v4_prefix_list_entries_inside_another_are_left_out() -> None:
    topo = demo_topology()
    topo["prefix_lists"][0]["entries"] = ["198.51.100.0/24", "198.51.100.64/26", "192.0.2.7/32"]
    prog = compile_vpc(network_of(topo), "vpc-demo", layout="v4")
    assert [box_of(k)[1] for k in prog.set_by_name["g_sg-web_in_p50_a_v4_0"].elements] == [
        Span(int(ipaddress.ip_address("192.0.2.7")), int(ipaddress.ip_address("192.0.2.7"))),
        Span(
            int(ipaddress.ip_address("198.51.100.0")), int(ipaddress.ip_address("198.51.100.255"))
        ),
    ]


def test_v4_rule_comments_are_static_and_within_the_limit(demo_v4: tuple[Network, Program]) -> None:
    _, prog = demo_v4
    comments = [r.comment for c in prog.chains for r in c.rules]
    assert all(len(c.encode()) <= COMMENT_MAX_BYTES for c in comments)
    web = [r.comment for r in prog.chain_by_name["in_eni-web1"].rules]
    assert web[:2] == ["p1 accept ipv4 sg-web part 0", "p1 accept ipv6 sg-web part 0"]
    assert web[-1] == "default ingress basic eni-web1"
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
    again = compile_vpc(network_of(topo), "vpc-demo", layout="v4")
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


# --------------------------------------------------------------------------- ct mark bit


def _revoked_rule(prog: Program) -> dict[str, Any]:
    (rule,) = [r for r in chain_rules(prog, "forward") if "denies" in r.get("comment", "")]
    return rule


def test_a_configured_ct_mark_bit_is_the_one_the_forward_chain_reads() -> None:
    net = load_network(DEMO.read_text())
    prog = compile_all(net, ct_mark_bit=0x10)["vpc-demo"]
    assert _revoked_rule(prog)["expr"] == [
        {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 0x10]}, "right": 0x10}},
        {"drop": None},
    ]
    assert compile_vpc(net, "vpc-demo", ct_mark_bit=0x10) == prog
    assert compile_vpc(net, "vpc-demo") != prog  # the default bit is another one


def test_an_established_flow_is_dropped_by_its_bit_not_by_foreign_bits() -> None:
    net = load_network(DEMO.read_text())
    bit = 0x10
    ruleset = Ruleset(compile_vpc(net, "vpc-demo", ct_mark_bit=bit).to_json())
    # A packet of an established flow between two ports: the conntrack shortcut
    # accepts it...
    one, two = sorted(net.enis.values(), key=lambda e: e.eni_id)[:2]
    reply = Packet(
        one.ifname, two.ifname, one.ipv4[0], two.ipv4[0], 6, 8080, 40000, "established"
    )
    assert ruleset.trace(reply).verdict == "accept"
    # ...whatever other users of the mark set, the default bit included...
    for foreign in (0x5, DEFAULT_CT_MARK_BIT, 0xFFFFFFFF & ~bit):
        packet = dataclasses.replace(reply, ct_mark=foreign)
        assert ruleset.trace(packet).verdict == "accept", hex(foreign)
    # ...and the configured bit drops it, alone or beside foreign bits.
    for marked in (bit, bit | 0x5, 0xFFFFFFFF):
        trace = ruleset.trace(dataclasses.replace(reply, ct_mark=marked))
        assert trace.verdict == "drop", hex(marked)
        assert "ct mark & 0x00000010" in str(trace)


def test_bit_31_is_written_as_the_prefix_nft_lists_it_as() -> None:
    # nft 1.0.6 lists `ct mark & 0x80000000 == 0x80000000` as `ct mark 0x80000000/1`.
    prog = Program("inet", "t", chains=(forward_chain(0x80000000),))
    assert _revoked_rule(prog)["expr"][0] == {
        "match": {
            "op": "==",
            "left": {"ct": {"key": "mark"}},
            "right": {"prefix": {"addr": 0x80000000, "len": 1}},
        }
    }


@pytest.mark.parametrize("bad", [0, 3, 0x30, -1, 1 << 32, 0xFFFFFFFF, True, "0x10"])
def test_a_ct_mark_bit_that_is_not_exactly_one_bit_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="exactly one bit of the 32-bit mark"):
        check_ct_mark_bit(bad)
    net = load_network(DEMO.read_text())
    with pytest.raises(ValueError, match="exactly one bit"):
        compile_all(net, ct_mark_bit=bad)  # type: ignore[arg-type]


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
    # Key order peer . dport . proto . sport . local (KEY_ORDER).
    assert '{"range": [0, 65535]}, 58, ' in text  # ICMPv6
    assert '{"range": [0, 65535]}, 47, ' in text  # GRE
    assert '"2001:db8:ff::", "len": 48' in text  # IPv6 prefix list
    # A local address (dest_cidr_ip on ingress) is the last field.
    assert '{"range": [8000, 8100]}, 6, {"range": [0, 65535]}, "10.2.1.11"]' in text
    # Source ports are the fourth field.
    assert '53, 17, {"range": [1024, 65535]}' in text
    # Flat sets hold address pieces that are not CIDR blocks, written as ranges.
    assert '{"range": ["0.0.0.0", "10.2.1.10"]}' in text
    # A secondary ENI is enforced on its own: the chains of its own group list.
    net = load_network((GOLDEN / "mixed.yaml").read_text())
    front, front_b = net.enis["eni-front"], net.enis["eni-front-b"]
    assert set(front.group_ids) != set(front_b.group_ids)
    chains = {c["add"]["chain"]["name"] for c in mixed if "chain" in c.get("add", {})}
    assert {f"in_{profile_id(front_b.group_ids)}", f"out_{profile_id(front_b.group_ids)}"} <= chains
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


def test_scale_compiles_with_lookups_bounded_by_a_constant(scale_network: Network) -> None:
    net = scale_network
    n_rules = sum(len(g.rules) for g in net.groups.values())
    times, render = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        prog = compile_vpc(net, "vpc-scale")
        t1 = time.perf_counter()
        text = json.dumps(prog.to_json())
        times.append(t1 - t0)
        render.append(time.perf_counter() - t1)
    flat = [s for s in prog.sets if s.name.startswith("f_")]
    fallback = [s for s in prog.sets if s.name.startswith("b_")]
    profiles = {profile_id(e.group_ids) for e in net.enis.values()}
    print(
        f"\nscale: {len(net.enis)} ENIs, {n_rules} rules, {len(profiles)} group lists -> "
        f"{len(prog.chains)} chains, {sum(len(c.rules) for c in prog.chains)} rules, "
        f"{len(prog.sets)} sets ({len(flat)} flat, {len(fallback)} fallback), "
        f"{prog.element_count()} elements, {len(text) / 1e6:.1f} MB JSON; "
        f"compile best {min(times):.3f}s, render best {min(render):.3f}s"
    )
    # The compile time is printed, not asserted: bench/ measures it side by side.
    # Objects per group list, nothing per ENI or per group: 4 flat sets per list.
    assert len(flat) == 4 * len(profiles)
    assert not fallback
    assert len(prog.sets) <= 4 * len(profiles) + len(net.groups) + 3
    # Per packet: each rule chain has one lookup per family (the packet's family
    # makes one of them), whatever the rules, priorities and groups.
    for pid in profiles:
        for prefix in ("in_", "out_"):
            rules = prog.chain_by_name[f"{prefix}{pid}"].rules
            lookups = [
                st.right.name
                for r in rules
                for st in r.statements
                if isinstance(st, Match) and isinstance(st.right, SetRef)
            ]
            side = "in" if prefix == "in_" else "out"
            assert lookups == [f"f_{pid}_{side}_v4", f"f_{pid}_{side}_v6"]
    print(
        f"scale: 2 set lookups per rule chain (one per family), "
        f"{sum(len(s.elements) for s in flat) / len(flat):.1f} elements per flat set, "
        f"largest {max(len(s.elements) for s in flat)}"
    )


def test_reference_cost_does_not_grow_with_other_groups_or_enis() -> None:
    """200 more ENIs in other groups with their own rules: the chain of an existing ENI
    and the sets it looks up stay as they were."""
    topo = demo_topology()
    vsw = next(i for i in topo["instances"] if i["instance_id"] == "i-web1")["vswitch_id"]
    topo["security_groups"].append(
        {
            "security_group_id": "sg-other",
            "vpc_id": "vpc-demo",
            "permissions": [
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": f"{p}/{p}",
                    "source_cidr_ip": "0.0.0.0/0",
                    "priority": 1,
                }
                for p in range(1, 150)
            ],
        }
    )
    before = compile_vpc(network_of(topo), "vpc-demo")
    for n in range(200):
        topo["instances"].append(
            {
                "instance_id": f"i-o{n}",
                "vswitch_id": vsw,
                "private_ip_address": f"10.0.1.{20 + n}",
                "security_group_ids": ["sg-other"],
            }
        )
    after = compile_vpc(network_of(topo), "vpc-demo")
    pid = profile_id(network_of(topo).enis["eni-app1"].group_ids)
    assert after.chain_by_name[f"in_{pid}"] == before.chain_by_name[f"in_{pid}"]
    for name in (f"f_{pid}_in_v4", f"f_{pid}_in_v6", f"f_{pid}_out_v4", f"f_{pid}_out_v6"):
        assert after.set_by_name[name] == before.set_by_name[name]


def test_key_order_is_a_permutation_and_lookup_types_agree(demo: tuple[Network, Program]) -> None:
    """Every rule set's type and every lookup's concatenation follow KEY_ORDER: the
    selector at each position reads the field the set's type holds there, and
    `box_of` undoes `key_of`."""
    assert sorted(KEY_ORDER) == [0, 1, 2, 3, 4]
    box = tuple(Span(i, i) for i in range(5))
    assert box_of(key_of(box)) == box and key_of(box) != box
    selector_type = {"l4proto": "inet_proto", "dport": "inet_service", "sport": "inet_service",
                     "saddr": "ipv4_addr", "daddr": "ipv4_addr"}
    _, prog = demo
    seen = 0
    for chain in prog.chains:
        for rule in chain.rules:
            for stmt in rule.statements:
                if isinstance(stmt, Match) and isinstance(stmt.right, SetRef):
                    s = prog.set_by_name[stmt.right.name]
                    if len(s.type) != 5 or s.type[0] != "ipv4_addr":
                        continue
                    got = [selector_type[getattr(x, "key", None) or x.field]  # type: ignore[union-attr]
                           for x in stmt.left.items]  # type: ignore[union-attr]
                    assert tuple(got) == s.type == RULE_SET_TYPE["ipv4"]
                    seen += 1
    assert seen
