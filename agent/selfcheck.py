"""Does the kernel's program decide flows the way the model says? Checked on real flows.

nftsg has two implementations of the policy: the reference evaluator
(`translators/evaluator.py`, docs/semantics.md made executable), which also
decides which established flows stay open, and the compiled nftables program
the kernel runs. Tests prove they agree on random models; this module checks it
in a running system: for tracked flows of a router (conntrack's original
tuples), the evaluator's verdict for the flow as new is compared with the
verdict of the packet tracer walking the flow's first packet through the
program *as listed from the kernel* (not as compiled). A disagreement means
either the compiler, the tracer, the evaluator or the kernel's table is wrong;
it is reported with both explanations.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nftsg.translators.errors import EcsError
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.explain import summarise
from nftsg.translators.network import Eni, ExternalHost, Network
from nftsg.translators.tracer import Packet, Ruleset, TraceError, packet_ports

# How many tracked flows one round checks (per router); the rest wait for later rounds.
DEFAULT_SAMPLE = 64


@dataclass
class SelfCheck:
    """The outcome for one router: flows checked, skipped (no endpoint in this VPC, or
    not traceable), and one line per disagreement."""

    namespace: str
    checked: int = 0
    skipped: int = 0
    disagreements: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.disagreements

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "checked": self.checked,
            "skipped": self.skipped,
            "disagreements": list(self.disagreements),
        }


def _port_of(network: Network, vpc_id: str, address: Any) -> Eni | ExternalHost | None:
    for owner in network.owners_of(address):
        if owner.vpc_id == vpc_id:
            return owner
    return None


def packet_of(network: Network, vpc_id: str, flow: Flow) -> Packet | None:
    """The flow's first packet as the router sees it (in at the sender's port, out at the
    receiver's), or None when an endpoint is not a port of this VPC."""
    src = _port_of(network, vpc_id, flow.src_ip)
    dst = _port_of(network, vpc_id, flow.dst_ip)
    if src is None or dst is None:
        return None
    sport, dport = packet_ports(flow.protocol, flow.sport, flow.dport)
    return Packet(
        iifname=src.ifname,
        oifname=dst.ifname,
        src_ip=flow.src_ip,
        dst_ip=flow.dst_ip,
        l4proto=flow.protocol,
        sport=sport,
        dport=dport,
        ct_state="new",
    )


def sample(flows: Sequence[Flow], size: int, rng: random.Random | None = None) -> list[Flow]:
    """Up to `size` distinct flows, chosen at random (every flow gets its turn over rounds)."""
    distinct = list(dict.fromkeys(flows))
    if len(distinct) <= size:
        return distinct
    return (rng or random).sample(distinct, size)


def check_flows(
    network: Network,
    vpc_id: str,
    namespace: str,
    listing: dict[str, Any] | Ruleset,
    flows: Iterable[Flow],
) -> SelfCheck:
    """Evaluator vs tracer over the kernel's listing, for each flow."""
    result = SelfCheck(namespace)
    try:
        ruleset = listing if isinstance(listing, Ruleset) else Ruleset(listing)
    except TraceError as exc:
        result.disagreements.append(f"the kernel's table cannot be traced: {exc}")
        return result
    for flow in flows:
        packet = packet_of(network, vpc_id, flow)
        if packet is None:
            result.skipped += 1
            continue
        try:
            decision = evaluate(network, flow, vpc_id=vpc_id)
            trace = ruleset.trace(packet)
        except (EcsError, TraceError) as exc:
            result.disagreements.append(f"{_show(flow)}: cannot be judged: {exc}")
            continue
        result.checked += 1
        if decision.verdict != trace.verdict:
            steps = " > ".join(trace.steps[-6:])
            result.disagreements.append(
                f"{_show(flow)}: evaluator {decision.verdict} ({summarise(decision, flow)}), "
                f"kernel program {trace.verdict} ({steps})"
            )
    return result


def _show(flow: Flow) -> str:
    return f"proto {flow.protocol} {flow.src_ip}:{flow.sport} -> {flow.dst_ip}:{flow.dport}"
