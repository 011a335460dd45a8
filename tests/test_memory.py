"""The memory levers keep behaviour: the drift check by digest, set by set, says what
the whole-form comparison says; a consumed replay builds the same model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from nftsg.agent.datastore import SqliteDatastore, replay
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.store import Store
from nftsg.translators import model as m
from nftsg.translators.canonical import (
    canonical_listing,
    canonical_program,
    describe_differences,
    differences_streaming,
    listing_objects,
    program_digests,
)
from nftsg.translators.compiler import compile_vpc
from nftsg.translators.validate import build_network
from test_compiler import scale_topology

NS = "r-scale"


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, dict[str, Any]]:
    net = build_network(m.topology_from_data(scale_topology(12, 10, 30)))
    program = compile_vpc(net, next(iter(net.vpcs)))
    fake = FakeBackend([NS])
    fake.apply(NS, program.full_sync_commands())
    listing = fake.list_table(NS, "inet", "nftsg")
    assert listing is not None
    return program, listing


def _tampers(listing: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    items = listing["nftables"]
    out = []
    with_elems = [i for i, x in enumerate(items) if x.get("set", {}).get("elem")]
    rules = [i for i, x in enumerate(items) if "rule" in x]
    chains = [i for i, x in enumerate(items) if "chain" in x]

    def variant(name: str, change: Any) -> None:
        t = copy.deepcopy(listing)
        change(t["nftables"])
        out.append((name, t))

    variant("element removed", lambda it: it[with_elems[0]]["set"]["elem"].pop())
    variant("element garbled", lambda it: it[with_elems[1]]["set"]["elem"].append({"x": 1}))
    variant("rule removed", lambda it: it.pop(rules[-1]))
    variant("rule comment", lambda it: it[rules[0]]["rule"].update(comment="other"))
    variant("chain removed", lambda it: it.pop(chains[-1]))
    variant("policy", lambda it: it[chains[0]]["chain"].update(policy="accept"))
    variant("set added", lambda it: it.append({"set": {"name": "zz", "type": "ifname"}}))
    variant("set removed", lambda it: it.pop(with_elems[0]))
    variant("unreadable", lambda it: it.append(["what"]))
    variant("reordered", lambda it: it.reverse())
    return out


def test_digest_comparison_says_what_the_whole_comparison_says(
    loaded: tuple[Any, dict[str, Any]],
) -> None:
    program, listing = loaded
    digests = program_digests(program)
    assert differences_streaming(program, digests, listing_objects(listing["nftables"])) == []
    for name, tampered in _tampers(listing):
        whole = describe_differences(canonical_program(program), canonical_listing(tampered))
        streamed = differences_streaming(program, digests, listing_objects(tampered["nftables"]))
        assert streamed == whole, name
        if name != "reordered":  # rules after chains in reverse: still a difference
            assert whole, name


def test_consumed_replay_builds_the_same_model(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.save_topology(m.topology_from_data(scale_topology(6, 5, 10)).model_dump(mode="json"))
    data = SqliteDatastore(store)
    kept, consumed = data.load(), data.load()
    assert kept is not None and consumed is not None
    assert replay(consumed, consume=True).network == replay(kept).network
    assert consumed.topology == {} and kept.topology
