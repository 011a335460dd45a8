"""The compiled program agrees with the reference evaluator on random models and flows.

For every flow, the evaluator's verdict (docs/semantics.md, executable) must equal
the verdict of the packet tracer walking the first packet of the flow through
`compile_vpc`'s program, entering at the sender's router-side port and
leaving at the receiver's. Two drivers: hypothesis (shrinks a failure to a
small model) and a plain loop over fixed seeds (the same seeds as the
real-namespace differential test can use).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nftsg.translators import compiler
from nftsg.translators.compiler import Layout, compile_vpc
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.network import IPAddress, Network
from nftsg.translators.tracer import CtState, Packet, Ruleset, Trace, packet_ports
from strategies import (
    VPC_ID,
    endpoint_of,
    endpoints,
    flows,
    models,
    network_of,
    random_flows,
    random_model,
)

FLOWS_PER_MODEL = 25
SEEDS = range(200)
DIFFERENTIAL = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def packet_of(network: Network, flow: Flow, ct_state: CtState = "new") -> Packet:
    """The flow's packet as the router sees it: in at the sender's port, out at the receiver's."""
    sport, dport = packet_ports(flow.protocol, flow.sport, flow.dport)
    return Packet(
        iifname=endpoint_of(network, flow.src_ip).ifname,
        oifname=endpoint_of(network, flow.dst_ip).ifname,
        src_ip=flow.src_ip,
        dst_ip=flow.dst_ip,
        l4proto=flow.protocol,
        sport=sport,
        dport=dport,
        ct_state=ct_state,
    )


def ruleset_of(network: Network, layout: Layout = compiler.DEFAULT_LAYOUT) -> Ruleset:
    return Ruleset(compile_vpc(network, VPC_ID, layout=layout).to_json())


def disagreement(label: str, model: dict[str, Any], flow: Flow, decision: Any, trace: Trace) -> str:
    return (
        f"evaluator and compiled program disagree ({label})\n"
        f"flow: {flow}\n"
        f"evaluator: {decision}\n"
        f"tracer: {trace}\n"
        f"model:\n{yaml.safe_dump(model, sort_keys=False)}"
    )


def check_agreement(
    label: str,
    model: dict[str, Any],
    network: Network,
    fl: list[Flow],
    layout: Layout = compiler.DEFAULT_LAYOUT,
) -> None:
    ruleset = ruleset_of(network, layout)
    for flow in fl:
        decision = evaluate(network, flow)
        trace = ruleset.trace(packet_of(network, flow))
        assert trace.verdict == decision.verdict, disagreement(label, model, flow, decision, trace)


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_models_agree(seed: int) -> None:
    model = random_model(seed)
    network = network_of(model)
    check_agreement(f"seed {seed}", model, network, random_flows(network, seed, FLOWS_PER_MODEL))


@pytest.mark.parametrize("seed", SEEDS[::4])
def test_seeded_models_agree_in_the_v4_layout(seed: int) -> None:
    model = random_model(seed)
    network = network_of(model)
    fl = random_flows(network, seed, FLOWS_PER_MODEL)
    check_agreement(f"seed {seed}, v4", model, network, fl, "v4")


@pytest.mark.parametrize("seed", SEEDS[::4])
def test_seeded_models_agree_when_every_side_falls_back_to_bucket_sets(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiler, "FLAT_LIMIT_MIN", 0)
    monkeypatch.setattr(compiler, "FLAT_LIMIT_PER_ELEMENT", 0)
    model = random_model(seed)
    network = network_of(model)
    prog = compile_vpc(network, VPC_ID)
    # Only sides with no wanted region at all stay flat (an empty set).
    assert all(not s.elements for s in prog.sets if s.name.startswith("f_"))
    fl = random_flows(network, seed, FLOWS_PER_MODEL)
    check_agreement(f"seed {seed}, fallback", model, network, fl)


@DIFFERENTIAL
@given(model=models(), data=st.data())
def test_hypothesis_models_agree(model: dict[str, Any], data: st.DataObject) -> None:
    network = network_of(model)
    fl = data.draw(flows(network, FLOWS_PER_MODEL), label="flows")
    check_agreement("hypothesis", model, network, fl)


def test_the_generator_covers_every_feature() -> None:
    """The seeds above really exercise what they claim to (a generator that drifted
    into trivial models would make the agreement tests pass vacuously)."""
    seen: set[str] = set()
    verdicts: set[tuple[str, str]] = set()
    for seed in SEEDS:
        model = random_model(seed)
        network = network_of(model)
        for group in network.groups.values():
            seen.add(f"type {group.group_type}/{group.inner_access_policy}")
            for rule in group.rules:
                seen.update(
                    {
                        f"protocol {rule.protocol}",
                        f"peer {type(rule.peer).__name__}",
                        f"policy {rule.policy}",
                        f"direction {rule.direction}",
                    }
                )
                if rule.local is not None:
                    seen.add("local")
                if rule.source_ports is not None:
                    seen.add("source ports")
        if any(not e.primary for e in network.enis.values()):
            seen.add("secondary eni")
        if any(g.is_vpc_default for g in network.groups.values()):
            seen.add("default group")
        if network.externals:
            seen.add("external")
        for flow in random_flows(network, seed, FLOWS_PER_MODEL):
            decision = evaluate(network, flow)
            verdicts.add((decision.reason, decision.verdict))
            seen.add(f"flow v{flow.version} proto {flow.protocol}")
    expected = {
        *(f"protocol {p}" for p in ("TCP", "UDP", "ICMP", "ICMPv6", "GRE", "ALL")),
        *(f"peer {k}" for k in ("CidrPeer", "GroupPeer", "PrefixListPeer")),
        "policy accept",
        "policy drop",
        "direction ingress",
        "direction egress",
        "type normal/Accept",
        "type normal/Drop",
        "type enterprise/Drop",
        "local",
        "source ports",
        "secondary eni",
        "default group",
        "external",
        *(f"flow v4 proto {p}" for p in (6, 17, 1, 47, 132)),
        *(f"flow v6 proto {p}" for p in (6, 17, 58, 47, 132)),
    }
    assert expected <= seen, sorted(expected - seen)
    assert {
        ("intra-group", "accept"),
        ("rules", "accept"),
        ("rules", "drop"),
        ("no-eni", "accept"),
    } <= verdicts


# -- state and anti-spoofing, in the compiled program ---------------------------------


def _spoofed_sources(network: Network, sender_ifname: str, version: int) -> list[IPAddress]:
    """Addresses of other ports, and one nobody owns, of one family."""
    others = [
        ep.address
        for ep in endpoints(network)
        if ep.ifname != sender_ifname and ep.address.version == version
    ]
    stranger = ipaddress.ip_address("10.0.250.1" if version == 4 else "2001:db8:10:ff::1")
    return [*others, stranger]


STATES_NEW_AND_ESTABLISHED: tuple[CtState, ...] = ("new", "established")


@pytest.mark.parametrize("seed", range(12))
def test_spoofed_sources_drop_whatever_the_rules_and_state(seed: int) -> None:
    network = network_of(random_model(seed))
    ruleset = ruleset_of(network)
    eps = endpoints(network)
    for sender in eps:
        for receiver in eps:
            if receiver.ifname == sender.ifname:
                continue
            for source in _spoofed_sources(network, sender.ifname, receiver.address.version):
                if source == receiver.address:
                    continue
                packet = Packet(
                    sender.ifname, receiver.ifname, source, receiver.address, 6, 40000, 22
                )
                for state in STATES_NEW_AND_ESTABLISHED:
                    trace = ruleset.trace(dataclasses.replace(packet, ct_state=state))
                    assert trace.verdict == "drop", f"{sender.owner} spoofing {source}\n{trace}"
                    # Dropped by the anti-spoofing lookup, before any state or rule.
                    assert "saddr != @port_addrs_v" in trace.steps[-1], str(trace)


def test_unknown_ports_drop() -> None:
    network = network_of(random_model(0))
    ruleset = ruleset_of(network)
    eni = next(iter(network.enis.values()))
    stranger = ipaddress.ip_address("10.0.250.1")
    # In from a port the program does not know: anti-spoofing drops it.
    assert ruleset.trace(Packet("nowhere", eni.ifname, stranger, eni.ipv4[0], 6)).verdict == "drop"
    # Out to a port the program does not know: whatever the rules, only known ports pass.
    assert ruleset.trace(Packet(eni.ifname, "nowhere", eni.ipv4[0], stranger, 6)).verdict == "drop"


STATES: tuple[tuple[CtState, str], ...] = (
    ("established", "accept"),
    ("related", "accept"),
    ("invalid", "drop"),
)


@pytest.mark.parametrize("seed", range(40))
def test_established_and_related_packets_pass_invalid_ones_drop(seed: int) -> None:
    model = random_model(seed)
    network = network_of(model)
    ruleset = ruleset_of(network)
    for flow in random_flows(network, seed, FLOWS_PER_MODEL):
        for state, expected in STATES:
            trace = ruleset.trace(packet_of(network, flow, state))
            assert trace.verdict == expected, disagreement(state, model, flow, state, trace)


def test_replies_pass_where_a_new_flow_the_other_way_would_not() -> None:
    """Stateful: the reply of an allowed flow passes although the rules drop that direction."""
    for seed in SEEDS:
        network = network_of(random_model(seed))
        for flow in random_flows(network, seed, FLOWS_PER_MODEL):
            reply = Flow(flow.dst_ip, flow.src_ip, flow.protocol, flow.sport, flow.dport)
            if (evaluate(network, flow).verdict, evaluate(network, reply).verdict) != (
                "accept",
                "drop",
            ):
                continue
            ruleset = ruleset_of(network)
            assert ruleset.trace(packet_of(network, flow)).verdict == "accept"
            assert ruleset.trace(packet_of(network, reply)).verdict == "drop"
            assert ruleset.trace(packet_of(network, reply, "established")).verdict == "accept"
            return
    pytest.fail("no one-way flow in any seeded model")
