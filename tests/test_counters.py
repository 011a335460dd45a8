"""Per-rule hit counters in the compiled program (translators/counters.py, compiler counters=True).

The counted program must decide exactly as the uncounted one (tracer vs evaluator),
and the element the kernel would count a new flow against must be labelled with the
evaluator's deciding rule (or the chain's default rule must count it)."""

from __future__ import annotations

import ipaddress

from nftsg.translators.compiler import compile_vpc, profile_id
from nftsg.translators.counters import (
    DEFAULT,
    attribute,
    counted_chains,
    element_labels,
    listed_counters,
)
from nftsg.translators.evaluator import Flow, SideDecision, evaluate
from nftsg.translators.network import Network
from nftsg.translators.nft import Program
from nftsg.translators.tracer import Ruleset, packet_ports
from strategies import VPC_ID, network_of, random_flows, random_model
from test_trace_vs_evaluator import packet_of

SEEDS = range(0, 200, 2)


def _point(flow: Flow, side: SideDecision) -> tuple[int, ...]:
    sport, dport = packet_ports(flow.protocol, flow.sport, flow.dport)
    peer, local = (
        (flow.dst_ip, flow.src_ip) if side.direction == "egress" else (flow.src_ip, flow.dst_ip)
    )
    return (flow.protocol, int(peer), dport, sport, int(local))


def _check_side(network: Network, prog: Program, flow: Flow, side: SideDecision | None) -> int:
    if side is None:
        return 0
    eni = network.enis[side.eni_id]
    chain = f"{'out' if side.direction == 'egress' else 'in'}_{profile_id(eni.group_ids)}"
    fam = "ipv4" if flow.version == 4 else "ipv6"
    got = attribute(prog, chain, fam, _point(flow, side))
    want = side.rule.rule_id if side.rule is not None else DEFAULT
    assert got == want, (flow, side, got)
    return 1


def test_counted_program_decides_as_the_evaluator_and_counts_the_deciding_rule() -> None:
    checked = by_rule = 0
    for seed in SEEDS:
        network = network_of(random_model(seed))
        prog = compile_vpc(network, VPC_ID, counters=True)
        ruleset = Ruleset(prog.to_json())
        for flow in random_flows(network, seed, 25):
            decision = evaluate(network, flow)
            assert ruleset.trace(packet_of(network, flow)).verdict == decision.verdict, flow
            if decision.reason == "rules":
                for side in (decision.egress, decision.ingress):
                    checked += _check_side(network, prog, flow, side)
                    by_rule += side is not None and side.rule is not None
    # The seeds exercise both: sides decided by a rule and by the default.
    assert by_rule > 100 and checked - by_rule > 100, (checked, by_rule)


def test_counting_is_off_by_default_and_every_counted_element_is_labelled() -> None:
    network = network_of(random_model(3))
    plain = compile_vpc(network, VPC_ID)
    assert not any(s.counter for s in plain.sets) and not counted_chains(plain)
    counted = compile_vpc(network, VPC_ID, counters=True)
    assert counted_chains(counted)
    for s in counted.sets:
        if s.name.startswith(("f_", "c_")):
            assert s.counter and len(s.labels) == len(s.elements)
    rule_ids = {r.rule_id for g in network.groups.values() for r in g.rules}
    assert set(element_labels(counted).values()) <= rule_ids
    # Labels are not content: the same boxes with other labels are the same set.
    assert counted == compile_vpc(network, VPC_ID, counters=True)


def test_listed_counters_reads_elements_and_default_rules() -> None:
    listing = {
        "nftables": [
            {
                "set": {
                    "family": "inet",
                    "table": "t",
                    "name": "f_x_in_v4",
                    "type": ["inet_proto", "ipv4_addr"],
                    "flags": ["interval"],
                    "stmt": [{"counter": None}],
                    "elem": [
                        {
                            "elem": {
                                "val": {
                                    "concat": ["tcp", {"prefix": {"addr": "10.0.0.0", "len": 24}}]
                                },
                                "counter": {"packets": 3, "bytes": 180},
                            }
                        }
                    ],
                }
            },
            {
                "rule": {
                    "chain": "in_x",
                    "expr": [{"counter": {"packets": 2, "bytes": 120}}, {"drop": None}],
                }
            },
        ]
    }
    got = listed_counters(listing)
    net = ipaddress.ip_network("10.0.0.0/24")
    key = ((6, 6), (int(net.network_address), int(net.broadcast_address)))
    assert got == {("f_x_in_v4", key): (3, 180), ("in_x", DEFAULT): (2, 120)}
