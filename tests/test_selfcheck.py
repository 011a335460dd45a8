"""The self-check: evaluator vs tracer over a router's listing, on flows of the model.

Over the listing the fake backend prints after loading the compiled program,
the two agree on random models and flows; over a listing an intruder changed
(the receiver's ingress no longer evaluated), the self-check reports exactly
the flows whose verdict changed, with both explanations.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.selfcheck import check_flows, packet_of, sample
from nftsg.agent.verify_command import planned_flows
from nftsg.translators.compiler import compile_vpc
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.network import Network
from strategies import VPC_ID, network_of, random_flows, random_model

NS = "sc-r-vpc"


def kernel_listing(network: Network) -> dict[str, Any]:
    backend = FakeBackend([NS])
    backend.apply(NS, compile_vpc(network, VPC_ID).full_sync_commands())
    listing = backend.list_table(NS, "inet", "nftsg")
    assert listing is not None
    return listing


@pytest.mark.parametrize("seed", range(12))
def test_evaluator_and_listed_program_agree(seed: int) -> None:
    network = network_of(random_model(seed))
    listing = kernel_listing(network)
    flows = random_flows(network, seed, 40) + planned_flows(network, VPC_ID, [22, 80], [53], 400)
    result = check_flows(network, VPC_ID, NS, listing, flows)
    assert result.disagreements == []
    assert result.checked + result.skipped == len(flows)
    assert result.checked > 0


def only_ingress_denies(network: Network, flow: Flow) -> bool:
    if packet_of(network, VPC_ID, flow) is None:
        return False
    decision = evaluate(network, flow, vpc_id=VPC_ID)
    egress, ingress = decision.egress, decision.ingress
    return (
        decision.verdict == "drop"
        and ingress is not None
        and ingress.verdict == "drop"
        and (egress is None or egress.verdict == "accept")
    )


def test_a_tampered_listing_is_caught_flow_by_flow() -> None:
    network = network_of(random_model(3))
    listing = copy.deepcopy(kernel_listing(network))
    # Drop the "receiver ingress" dispatch: ingress rules are no longer evaluated.
    listing["nftables"] = [
        item
        for item in listing["nftables"]
        if item.get("rule", {}).get("comment") != "receiver ingress"
    ]
    flows = planned_flows(network, VPC_ID, [22, 80, 443], [53], 2000)
    result = check_flows(network, VPC_ID, NS, listing, flows)
    expected = [f for f in flows if only_ingress_denies(network, f)]
    assert expected, "the model has no flow that only ingress denies"
    assert len(result.disagreements) == len(expected)
    assert all(
        "evaluator drop" in line and "kernel program accept" in line
        for line in result.disagreements
    )


def test_flows_outside_the_vpc_are_skipped_not_judged() -> None:
    network = network_of(random_model(1))
    listing = kernel_listing(network)
    stranger = Flow(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"), 6, 80)
    result = check_flows(network, VPC_ID, NS, listing, [stranger])
    assert (result.checked, result.skipped, result.disagreements) == (0, 1, [])


def test_an_untraceable_listing_is_a_disagreement() -> None:
    network = network_of(random_model(1))
    listing = kernel_listing(network)
    listing["nftables"].append(
        {
            "rule": {
                "family": "inet",
                "table": "nftsg",
                "chain": "forward",
                "expr": [{"xt": {"name": "mystery"}}],
            }
        }
    )
    result = check_flows(network, VPC_ID, NS, listing, random_flows(network, 1, 5))
    assert not result.ok and "cannot be traced" in result.disagreements[0]


def test_sample_is_bounded_and_distinct() -> None:
    network = network_of(random_model(2))
    flows = random_flows(network, 2, 50) * 3
    picked = sample(flows, 10)
    assert len(picked) == 10 and len(set(picked)) == 10
    assert set(sample(flows, 1000)) == set(flows)
