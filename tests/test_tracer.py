"""The packet tracer on small hand-written programs: one construct at a time.

Programs are written as the libnftables JSON commands the compiler emits (and,
in one test, as `nft -j list ruleset` prints them), so these tests pin down
the tracer's reading of nft semantics independently of the compiler.
"""

from __future__ import annotations

from typing import Any

import pytest
from nftsg.translators.tracer import (
    InvalidProgram,
    Packet,
    Ruleset,
    UnsupportedExpression,
    packet_ports,
    trace,
)

T = {"family": "inet", "table": "t"}


def table() -> dict[str, Any]:
    return {"add": {"table": {"family": "inet", "name": "t"}}}


def base(policy: str = "drop", name: str = "forward") -> dict[str, Any]:
    spec = {**T, "name": name, "type": "filter", "hook": "forward", "prio": 0, "policy": policy}
    return {"add": {"chain": spec}}


def chain(name: str) -> dict[str, Any]:
    return {"add": {"chain": {**T, "name": name}}}


def rule(chain_name: str, *expr: Any) -> dict[str, Any]:
    return {"add": {"rule": {**T, "chain": chain_name, "expr": list(expr)}}}


def aset(name: str, type_: Any, elem: list[Any], flags: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {**T, "name": name, "type": type_, "elem": elem}
    if flags:
        spec["flags"] = flags
    return {"add": {"set": spec}}


def amap(name: str, type_: Any, elem: list[Any]) -> dict[str, Any]:
    return {"add": {"map": {**T, "name": name, "type": type_, "map": "verdict", "elem": elem}}}


def program(*commands: Any) -> dict[str, Any]:
    return {"nftables": [table(), *commands]}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def concat(*items: Any) -> dict[str, Any]:
    return {"concat": list(items)}


def rng(lo: Any, hi: Any) -> dict[str, Any]:
    return {"range": [lo, hi]}


def prefix(addr: str, length: int) -> dict[str, Any]:
    return {"prefix": {"addr": addr, "len": length}}


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}
RETURN: dict[str, Any] = {"return": None}


def jump(target: str) -> dict[str, Any]:
    return {"jump": {"target": target}}


def goto(target: str) -> dict[str, Any]:
    return {"goto": {"target": target}}


def tcp4(dport: int = 80, sport: int = 40000, **kw: Any) -> Packet:
    fields: dict[str, Any] = {
        "iifname": "ea",
        "oifname": "eb",
        "src_ip": "10.0.0.1",
        "dst_ip": "10.0.0.2",
        "l4proto": 6,
        "sport": sport,
        "dport": dport,
    }
    fields.update(kw)
    return Packet(**fields)


def tcp6(**kw: Any) -> Packet:
    return tcp4(**{"src_ip": "2001:db8::1", "dst_ip": "2001:db8::2", **kw})


def verdict(prog: dict[str, Any], packet: Packet) -> str:
    return trace(prog, packet).verdict


# -- chains and verdicts --------------------------------------------------------


@pytest.mark.parametrize("policy", ["accept", "drop"])
def test_empty_base_chain_applies_its_policy(policy: str) -> None:
    result = trace(program(base(policy)), tcp4())
    assert result.verdict == policy
    assert result.steps[0] == f"chain forward (hook forward, policy {policy})"


def test_first_matching_verdict_wins() -> None:
    prog = program(
        base("drop"),
        rule("forward", match(meta("iifname"), "ez"), DROP),
        rule("forward", match(meta("iifname"), "ea"), ACCEPT),
        rule("forward", DROP),
    )
    result = trace(prog, tcp4())
    assert result.verdict == "accept"
    assert result.steps[1:] == [
        'forward[1] iifname "ez" drop: no match (iifname "ez")',
        'forward[2] iifname "ea" accept: match -> accept',
    ]


def test_rule_without_verdict_goes_on() -> None:
    prog = program(base("drop"), rule("forward", match(meta("iifname"), "ea"), {"counter": None}))
    assert verdict(prog, tcp4()) == "drop"


def test_jump_return_continues_after_the_jump() -> None:
    prog = program(
        base("drop"),
        chain("sub"),
        rule("forward", jump("sub")),
        rule("forward", ACCEPT),
        rule("sub", match(meta("oifname"), "eb"), RETURN),
        rule("sub", DROP),
    )
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp4(oifname="ec")) == "drop"


def test_falling_off_a_regular_chain_returns() -> None:
    prog = program(
        base("drop"),
        chain("sub"),
        rule("forward", jump("sub")),
        rule("forward", ACCEPT),
        rule("sub", match(meta("oifname"), "zz"), DROP),
    )
    result = trace(prog, tcp4())
    assert result.verdict == "accept"
    assert "sub: end of chain, return" in result.steps


def test_goto_does_not_come_back() -> None:
    prog = program(
        base("drop"),
        chain("sub"),
        rule("forward", goto("sub")),
        rule("forward", ACCEPT),
    )
    # The end of a chain reached by goto returns past the base chain: policy.
    assert verdict(prog, tcp4()) == "drop"


def test_return_in_the_base_chain_applies_the_policy() -> None:
    prog = program(base("accept"), rule("forward", RETURN), rule("forward", DROP))
    assert verdict(prog, tcp4()) == "accept"


def test_nested_jumps_unwind_one_level_at_a_time() -> None:
    prog = program(
        base("drop"),
        chain("a"),
        chain("b"),
        rule("forward", jump("a")),
        rule("forward", DROP),
        rule("a", jump("b")),
        rule("a", ACCEPT),
        rule("b", RETURN),
        rule("b", DROP),
    )
    assert verdict(prog, tcp4()) == "accept"


def test_continue_goes_to_the_next_rule() -> None:
    prog = program(base("drop"), rule("forward", {"continue": None}), rule("forward", ACCEPT))
    assert verdict(prog, tcp4()) == "accept"


def test_a_jump_loop_is_refused() -> None:
    prog = program(base("drop"), chain("a"), rule("forward", jump("a")), rule("a", jump("a")))
    with pytest.raises(InvalidProgram, match="jump stack"):
        trace(prog, tcp4())


# -- matches ----------------------------------------------------------------------


def test_meta_nfproto() -> None:
    prog = program(base("accept"), rule("forward", match(meta("nfproto"), "ipv6"), DROP))
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp6()) == "drop"


@pytest.mark.parametrize("right", ["udp", 17])
def test_meta_l4proto_by_name_or_number(right: Any) -> None:
    prog = program(base("accept"), rule("forward", match(meta("l4proto"), right), DROP))
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp4(l4proto=17)) == "drop"


def test_interface_names_equal_and_not_equal() -> None:
    prog = program(
        base("drop"),
        rule("forward", match(meta("iifname"), "ea"), match(meta("oifname"), "eb", "!="), DROP),
        rule("forward", match(meta("oifname"), "eb"), ACCEPT),
    )
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp4(oifname="ec")) == "drop"


def test_ipv4_prefix_and_address() -> None:
    prog = program(
        base("drop"),
        rule(
            "forward",
            match(payload("ip", "saddr"), prefix("10.0.0.0", 24)),
            match(payload("ip", "daddr"), "10.0.0.2"),
            ACCEPT,
        ),
    )
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp4(src_ip="10.0.1.1")) == "drop"
    assert verdict(prog, tcp4(dst_ip="10.0.0.3")) == "drop"


def test_ip_fields_never_match_the_other_family_even_negated() -> None:
    # nft puts `meta nfproto ipv4` in front of `ip saddr`: the rule cannot match IPv6.
    prog = program(
        base("accept"),
        rule("forward", match(payload("ip", "saddr"), "192.0.2.1", "!="), DROP),
    )
    assert verdict(prog, tcp4()) == "drop"
    result = trace(prog, tcp6())
    assert result.verdict == "accept"
    assert "ip saddr on an ipv6 packet" in result.steps[1]


def test_ipv6_prefix() -> None:
    prog = program(
        base("drop"),
        rule("forward", match(payload("ip6", "daddr"), prefix("2001:db8::", 64)), ACCEPT),
    )
    assert verdict(prog, tcp6()) == "accept"
    assert verdict(prog, tcp6(dst_ip="2001:db8:1::2")) == "drop"
    assert verdict(prog, tcp4()) == "drop"


def test_transport_ports_in_an_anonymous_set() -> None:
    ports = {"set": [22, rng(80, 90)]}
    prog = program(
        base("drop"),
        rule("forward", match(payload("th", "dport"), ports), ACCEPT),
        rule("forward", match(payload("th", "sport"), 53), ACCEPT),
    )
    assert [verdict(prog, tcp4(dport=p)) for p in (21, 22, 79, 80, 90, 91)] == [
        "drop",
        "accept",
        "drop",
        "accept",
        "accept",
        "drop",
    ]
    assert verdict(prog, tcp4(dport=1, sport=53)) == "accept"


CT_VMAP = {
    "vmap": {
        "key": {"ct": {"key": "state"}},
        "data": {
            "set": [["invalid", DROP], ["established", ACCEPT], ["related", ACCEPT]],
        },
    }
}


@pytest.mark.parametrize(
    ("state", "expected"),
    [("new", "drop"), ("established", "accept"), ("related", "accept"), ("invalid", "drop")],
)
def test_ct_state_vmap(state: str, expected: str) -> None:
    # Policy accept, and a drop for new flows after the vmap: invalid must be
    # dropped by the vmap itself, established/related accepted by it.
    prog = program(base("accept"), rule("forward", CT_VMAP), rule("forward", DROP))
    assert verdict(prog, tcp4(ct_state=state)) == expected


def test_ct_state_flag_list() -> None:
    state = {"ct": {"key": "state"}}
    prog = program(
        base("drop"), rule("forward", match(state, ["established", "related"], "in"), ACCEPT)
    )
    assert verdict(prog, tcp4(ct_state="related")) == "accept"
    assert verdict(prog, tcp4(ct_state="new")) == "drop"


# -- the conntrack mark, read under a mask ------------------------------------------

CT_MARK = {"ct": {"key": "mark"}}
FOREIGN = 0x5  # bits of another user of ct marks on the host


def masked(mask: int) -> dict[str, Any]:
    return {"&": [CT_MARK, mask]}


def listed_revoke_rule(expr: dict[str, Any]) -> dict[str, Any]:
    """A listing (``nft -j list ruleset`` of nft 1.0.6) whose forward chain drops marked flows."""
    return {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "t", "handle": 1}},
            {"chain": {**T, "name": "forward", "handle": 1, "type": "filter",
                       "hook": "forward", "prio": 0, "policy": "accept"}},
            {"rule": {**T, "chain": "forward", "handle": 2, "comment": "revoked",
                      "expr": [expr, DROP]}},
        ]
    }


@pytest.mark.parametrize("bit", [0x1, 0x40000000, 0x80000000])
def test_a_masked_ct_mark_match_reads_only_its_bit(bit: int) -> None:
    prog = program(base("accept"), rule("forward", match(masked(bit), bit), DROP))
    for mark in (0, FOREIGN & ~bit or 0x2, 0xFFFFFFFF & ~bit):
        assert verdict(prog, tcp4(ct_mark=mark)) == "accept", hex(mark)
    for mark in (bit, bit | 0x6, 0xFFFFFFFF):
        assert verdict(prog, tcp4(ct_mark=mark)) == "drop", hex(mark)


def test_a_masked_ct_mark_compared_with_zero() -> None:
    prog = program(base("accept"), rule("forward", match(masked(0x10), 0, "!="), DROP))
    assert verdict(prog, tcp4(ct_mark=0x10 | FOREIGN)) == "drop"
    assert verdict(prog, tcp4(ct_mark=FOREIGN)) == "accept"


@pytest.mark.parametrize(
    ("bit", "expr"),
    [
        # As nft 1.0.6 lists `ct mark & 0x40000000 == 0x40000000`...
        pytest.param(
            0x40000000, match(masked(0x40000000), 0x40000000), id="and-form"
        ),
        # ...and `ct mark & 0x80000000 == 0x80000000`: `ct mark 0x80000000/1`.
        pytest.param(
            0x80000000,
            match(CT_MARK, {"prefix": {"addr": 0x80000000, "len": 1}}),
            id="prefix-form",
        ),
    ],
)
def test_the_listed_forms_of_the_revoke_rule(bit: int, expr: dict[str, Any]) -> None:
    ruleset = Ruleset(listed_revoke_rule(expr))
    assert ruleset.trace(tcp4(ct_mark=FOREIGN)).verdict == "accept"
    assert ruleset.trace(tcp4(ct_mark=0x7FFFFFFF & ~bit)).verdict == "accept"
    assert ruleset.trace(tcp4(ct_mark=bit)).verdict == "drop"
    assert ruleset.trace(tcp4(ct_mark=bit | FOREIGN)).verdict == "drop"


def test_a_mark_prefix_of_two_bits() -> None:
    # `ct mark & 0xc0000000 == 0x40000000`, listed as `ct mark 0x40000000/2`.
    two_bits = {"prefix": {"addr": 0x40000000, "len": 2}}
    ruleset = Ruleset(listed_revoke_rule(match(CT_MARK, two_bits)))
    assert ruleset.trace(tcp4(ct_mark=0x40000000 | FOREIGN)).verdict == "drop"
    assert ruleset.trace(tcp4(ct_mark=0xC0000000)).verdict == "accept"
    assert ruleset.trace(tcp4(ct_mark=FOREIGN)).verdict == "accept"


def test_a_packet_mark_must_be_32_bits() -> None:
    prog = program(base("accept"), rule("forward", match(masked(1), 1), DROP))
    with pytest.raises(ValueError, match="32-bit"):
        verdict(prog, tcp4(ct_mark=1 << 32))


# -- named sets and maps ----------------------------------------------------------

RULE_SET_TYPE = ["inet_proto", "ipv4_addr", "inet_service", "inet_service", "ipv4_addr"]
EGRESS_KEY = concat(
    meta("l4proto"),
    payload("ip", "daddr"),
    payload("th", "dport"),
    payload("th", "sport"),
    payload("ip", "saddr"),
)


def rule_set_program(elements: list[Any], op: str = "==") -> dict[str, Any]:
    return program(
        base("drop"),
        aset("bucket", RULE_SET_TYPE, elements, ["interval"]),
        rule(
            "forward",
            match(meta("nfproto"), "ipv4"),
            match(EGRESS_KEY, "@bucket", op),
            ACCEPT,
        ),
    )


def test_concatenated_lookup_with_intervals_in_every_field() -> None:
    prog = rule_set_program(
        [
            concat(6, prefix("10.0.0.0", 24), rng(80, 443), rng(1024, 65535), "10.0.0.1"),
            concat(rng(0, 255), "192.0.2.9", rng(0, 65535), rng(0, 65535), prefix("0.0.0.0", 0)),
        ]
    )
    assert verdict(prog, tcp4(dport=80, sport=1024)) == "accept"
    assert verdict(prog, tcp4(dport=443, sport=65535)) == "accept"
    assert verdict(prog, tcp4(dport=444)) == "drop"
    assert verdict(prog, tcp4(dport=79)) == "drop"
    assert verdict(prog, tcp4(sport=1023)) == "drop"
    assert verdict(prog, tcp4(l4proto=17)) == "drop"
    assert verdict(prog, tcp4(dst_ip="10.0.1.2")) == "drop"
    assert verdict(prog, tcp4(src_ip="10.0.0.3")) == "drop"
    # The second element: any protocol, any port, any source, to 192.0.2.9.
    assert verdict(prog, tcp4(l4proto=47, sport=0, dport=0, dst_ip="192.0.2.9")) == "accept"


def test_concatenated_lookup_negated() -> None:
    prog = rule_set_program([concat(6, "10.0.0.2", 80, rng(0, 65535), "10.0.0.1")], op="!=")
    assert verdict(prog, tcp4(dport=80)) == "drop"
    assert verdict(prog, tcp4(dport=81)) == "accept"


def test_protocol_names_in_elements() -> None:
    # `nft -j list` prints protocol numbers as names.
    prog = rule_set_program([concat("tcp", "10.0.0.2", 80, rng(0, 65535), "10.0.0.1")])
    assert verdict(prog, tcp4(dport=80)) == "accept"


def test_portless_protocols_match_only_full_port_ranges() -> None:
    # ICMP carries no ports: the tracer's packet has 0, 0, which only the
    # full 0-65535 range the compiler writes for such rules covers.
    assert packet_ports(1, 1234, 5678) == (0, 0)
    assert packet_ports(47, 1, 1) == (0, 0)
    assert packet_ports(132, 1, 2) == (1, 2)
    assert packet_ports(6, 1, 2) == (1, 2)
    sport, dport = packet_ports(1, 9, 9)
    icmp = tcp4(l4proto=1, sport=sport, dport=dport)
    full = rule_set_program([concat(1, "10.0.0.2", rng(0, 65535), rng(0, 65535), "10.0.0.1")])
    tcp_like = rule_set_program([concat(1, "10.0.0.2", rng(1, 65535), rng(0, 65535), "10.0.0.1")])
    assert verdict(full, icmp) == "accept"
    assert verdict(tcp_like, icmp) == "drop"


def test_anti_spoofing_set_of_port_and_address() -> None:
    prog = program(
        base("accept"),
        aset("port_addrs_v4", ["ifname", "ipv4_addr"], [concat("ea", "10.0.0.1")]),
        rule(
            "forward",
            match(meta("nfproto"), "ipv4"),
            match(concat(meta("iifname"), payload("ip", "saddr")), "@port_addrs_v4", "!="),
            DROP,
        ),
    )
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp4(src_ip="10.0.0.9")) == "drop"
    assert verdict(prog, tcp4(iifname="ez")) == "drop"
    assert verdict(prog, tcp6()) == "accept"


def test_membership_in_a_named_ifname_set() -> None:
    prog = program(
        base("drop"),
        aset("ports", "ifname", ["ea", "eb"]),
        rule("forward", match(meta("oifname"), "@ports"), ACCEPT),
    )
    assert verdict(prog, tcp4()) == "accept"
    assert verdict(prog, tcp4(oifname="ec")) == "drop"


def test_elements_added_by_add_element() -> None:
    prog = program(
        base("drop"),
        aset("ports", "ifname", []),
        {"add": {"element": {**T, "name": "ports", "elem": ["eb"]}}},
        rule("forward", match(meta("oifname"), "@ports"), ACCEPT),
    )
    assert verdict(prog, tcp4()) == "accept"


def dispatch_program() -> dict[str, Any]:
    return program(
        base("drop"),
        chain("out_a"),
        chain("in_b"),
        amap("egress", "ifname", [["ea", jump("out_a")]]),
        amap("ingress", "ifname", [["eb", jump("in_b")], ["ec", DROP]]),
        rule("forward", {"vmap": {"key": meta("iifname"), "data": "@egress"}}),
        rule("forward", {"vmap": {"key": meta("oifname"), "data": "@ingress"}}),
        rule("forward", ACCEPT),
        rule("out_a", match(payload("th", "dport"), 23), DROP),
        rule("in_b", match(payload("th", "dport"), 80), RETURN),
        rule("in_b", DROP),
    )


def test_verdict_map_dispatch() -> None:
    prog = dispatch_program()
    assert verdict(prog, tcp4(dport=80)) == "accept"
    assert verdict(prog, tcp4(dport=23)) == "drop"  # out_a drops
    assert verdict(prog, tcp4(dport=22)) == "drop"  # in_b drops
    assert verdict(prog, tcp4(oifname="ec")) == "drop"  # a plain verdict element
    # No element for the ports: both lookups fall through to the accept.
    result = trace(prog, tcp4(iifname="ex", oifname="ey", dport=23))
    assert result.verdict == "accept"
    assert result.steps[1] == "forward[1] iifname vmap @egress: no element for iifname"


def test_steps_name_chains_and_rules_visited() -> None:
    steps = trace(dispatch_program(), tcp4(dport=80)).steps
    assert steps == [
        "chain forward (hook forward, policy drop)",
        "forward[1] iifname vmap @egress: iifname found -> jump out_a",
        "out_a[1] th dport 23 drop: no match (th dport 23)",
        "out_a: end of chain, return",
        "forward[2] oifname vmap @ingress: oifname found -> jump in_b",
        "in_b[1] th dport 80 return: match -> return",
        "forward[3] accept: match -> accept",
    ]


# -- whole programs ------------------------------------------------------------------


def test_full_sync_batch_add_delete_add() -> None:
    # The compiler's full sync: add table; delete table; add table; ... The
    # delete must forget whatever came before it.
    prog = {
        "nftables": [
            table(),
            base("accept"),
            rule("forward", DROP),
            {"delete": {"table": {"family": "inet", "name": "t"}}},
            table(),
            base("drop"),
            rule("forward", ACCEPT),
        ]
    }
    result = trace(prog, tcp4())
    assert result.verdict == "accept"
    assert len(result.steps) == 2


def test_flush_chain_and_set() -> None:
    prog = program(
        base("accept"),
        aset("ports", "ifname", ["eb"]),
        rule("forward", DROP),
        {"flush": {"chain": {**T, "name": "forward"}}},
        rule("forward", match(meta("oifname"), "@ports"), DROP),
        {"flush": {"set": {**T, "name": "ports"}}},
    )
    assert verdict(prog, tcp4()) == "accept"


def test_a_ruleset_listed_by_nft() -> None:
    # Trimmed from `nft -j list ruleset` (nftables 1.0.6): metainfo, handles,
    # protocol names, and the implicit `meta nfproto ipv4` left out.
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "t", "handle": 1}},
            {
                "set": {
                    **T,
                    "name": "port_addrs_v4",
                    "type": ["ifname", "ipv4_addr"],
                    "handle": 4,
                    "elem": [{"concat": ["ea", "10.0.0.1"]}],
                }
            },
            {
                "set": {
                    **T,
                    "name": "b",
                    "type": RULE_SET_TYPE,
                    "handle": 10,
                    "flags": ["interval"],
                    "elem": [
                        {"concat": ["tcp", prefix("10.0.0.0", 8), 22, rng(0, 65535), "10.0.0.1"]}
                    ],
                }
            },
            {
                "chain": {
                    **T,
                    "name": "forward",
                    "handle": 3,
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "drop",
                }
            },
            {
                "rule": {
                    **T,
                    "chain": "forward",
                    "handle": 16,
                    "expr": [
                        match(
                            concat(meta("iifname"), payload("ip", "saddr")),
                            "@port_addrs_v4",
                            "!=",
                        ),
                        DROP,
                    ],
                }
            },
            {"rule": {**T, "chain": "forward", "handle": 17, "expr": [CT_VMAP]}},
            {
                "rule": {
                    **T,
                    "chain": "forward",
                    "handle": 18,
                    "expr": [
                        match(EGRESS_KEY, "@b"),
                        {"counter": {"packets": 0, "bytes": 0}},
                        ACCEPT,
                    ],
                }
            },
        ]
    }
    ruleset = Ruleset(listing)
    assert ruleset.trace(tcp4(dport=22)).verdict == "accept"
    assert ruleset.trace(tcp4(dport=23)).verdict == "drop"
    assert ruleset.trace(tcp4(dport=22, src_ip="10.0.0.7")).verdict == "drop"
    assert ruleset.trace(tcp6(dport=22)).verdict == "drop"


def test_packet_families_must_agree() -> None:
    with pytest.raises(ValueError, match="never mix"):
        trace(program(base()), tcp4(dst_ip="2001:db8::2"))


# -- loud failures ---------------------------------------------------------------------

UNSUPPORTED_RULES = [
    pytest.param(match(payload("tcp", "dport"), 22), id="tcp payload"),
    pytest.param(match(meta("mark"), 1), id="meta mark"),
    pytest.param(match({"&": [meta("mark"), 1]}, 1), id="meta mark masked"),
    pytest.param(match({"&": [{"ct": {"key": "state"}}, 1]}, 1), id="ct state masked"),
    pytest.param(match({"&": [{"ct": {"key": "mark"}}, "x"]}, 1), id="mask not a number"),
    pytest.param(match({"&": [{"ct": {"key": "mark"}}, 1 << 32]}, 1), id="mask over 32 bits"),
    pytest.param(match({"&": [{"ct": {"key": "mark"}}]}, 1), id="and of one operand"),
    pytest.param(match({"|": [{"ct": {"key": "mark"}}, 1]}, 1), id="bitwise or"),
    pytest.param(
        match({"ct": {"key": "mark"}}, {"prefix": {"addr": 1, "len": 1, "x": 0}}),
        id="mark prefix keys",
    ),
    pytest.param(match({"ct": {"key": "status"}}, "dnat"), id="ct status"),
    pytest.param(match(payload("th", "dport"), 22, "<"), id="operator <"),
    pytest.param(match(meta("iifname"), "e*"), id="ifname wildcard"),
    pytest.param(match(payload("th", "dport"), "ssh"), id="service name"),
    pytest.param({"log": {"prefix": "x"}}, id="log without NFLOG group"),
    pytest.param({"limit": {"rate": 1, "per": "second"}}, id="limit beside a verdict"),
    pytest.param({"reject": None}, id="reject"),
    pytest.param({"queue": {"num": 1}}, id="queue"),
    pytest.param({"mangle": {"key": meta("mark"), "value": 1}}, id="mangle"),
    pytest.param({"vmap": {"key": meta("iifname"), "data": {"map": []}}}, id="vmap data"),
    pytest.param({"jump": {"target": "x", "extra": 1}}, id="verdict keys"),
]


@pytest.mark.parametrize("expr", UNSUPPORTED_RULES)
def test_unsupported_expressions_raise(expr: Any) -> None:
    with pytest.raises(UnsupportedExpression):
        Ruleset(program(base(), rule("forward", expr, ACCEPT)))


@pytest.mark.parametrize(
    "command",
    [
        pytest.param({"insert": {"rule": {**T, "chain": "forward", "expr": []}}}, id="insert"),
        pytest.param({"replace": {"rule": {**T, "chain": "forward", "expr": []}}}, id="replace"),
        pytest.param(
            {"add": {"set": {**T, "name": "s", "type": "ifname", "flags": ["timeout"]}}},
            id="set timeout",
        ),
        pytest.param({"add": {"set": {**T, "name": "s", "type": "ether_addr"}}}, id="ether set"),
        pytest.param(
            {"add": {"map": {**T, "name": "m", "type": "ifname", "map": "ipv4_addr"}}},
            id="data map",
        ),
        pytest.param(
            {"add": {"chain": {**T, "name": "p", "type": "nat", "hook": "prerouting", "prio": 0}}},
            id="prerouting chain",
        ),
        pytest.param({"add": {"table": {"family": "ip", "name": "u"}}}, id="second table"),
        pytest.param({"add": {"counter": {**T, "name": "c"}}}, id="named counter"),
        pytest.param(
            {"add": {"rule": {**T, "chain": "forward", "position": 1, "expr": []}}},
            id="rule position",
        ),
    ],
)
def test_unsupported_commands_raise(command: Any) -> None:
    with pytest.raises(UnsupportedExpression):
        Ruleset(program(base(), command))


def test_two_forward_base_chains_are_unsupported() -> None:
    with pytest.raises(UnsupportedExpression, match="one base chain"):
        Ruleset(program(base(), base(name="other")))


@pytest.mark.parametrize(
    ("commands", "message"),
    [
        pytest.param([rule("forward", jump("nowhere"))], "no such chain", id="unknown chain"),
        pytest.param(
            [amap("m", "ifname", [["ea", goto("nowhere")]])], "no such chain", id="map target"
        ),
        pytest.param(
            [rule("forward", match(meta("iifname"), "@nothing"), ACCEPT)],
            "unknown set",
            id="unknown set",
        ),
        pytest.param(
            [
                aset("s", "ipv4_addr", ["10.0.0.1"]),
                rule("forward", match(meta("iifname"), "@s"), ACCEPT),
            ],
            "of type ipv4_addr",
            id="type mismatch",
        ),
        pytest.param(
            [aset("s", "inet_service", [rng(1, 10)])], "without flags interval", id="no interval"
        ),
        pytest.param(
            [aset("s", "inet_service", [rng(1, 10), rng(10, 20)], ["interval"])],
            "overlap",
            id="overlapping intervals",
        ),
        pytest.param(
            [
                aset(
                    "t",
                    RULE_SET_TYPE,
                    [
                        concat(6, prefix("10.0.0.0", 8), rng(1, 100), 1, "10.0.0.2"),
                        concat(6, "10.0.0.1", rng(50, 60), 1, "10.0.0.2"),
                    ],
                    ["interval"],
                )
            ],
            "overlap",
            id="overlapping concatenations",
        ),
        pytest.param(
            [amap("m", "ifname", [["ea", ACCEPT], ["ea", DROP]])], "two verdicts", id="map clash"
        ),
        pytest.param([rule("forward", ACCEPT, DROP)], "after the verdict", id="after verdict"),
        pytest.param(
            [aset("s", "ipv4_addr", ["2001:db8::1"])], "not a valid ipv4_addr", id="bad address"
        ),
        pytest.param([rule("forward", jump("forward"))], "base chain", id="jump to base chain"),
    ],
)
def test_programs_the_kernel_would_refuse_raise(commands: list[Any], message: str) -> None:
    with pytest.raises(InvalidProgram, match=message):
        Ruleset(program(base(), *commands))


def test_identical_interval_elements_are_merged_not_refused() -> None:
    element = concat(6, "10.0.0.2", 80, rng(0, 65535), "10.0.0.1")
    prog = rule_set_program([element, element])
    assert verdict(prog, tcp4(dport=80)) == "accept"
