"""The fake backend behaves like the kernel on the commands the compiler emits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nftsg.agent.fake_backend import FakeBackend, canonical
from nftsg.agent.nft_backend import NamespaceNotFound, NftError

NS = "vpc-test"
T = {"family": "inet", "table": "nftsg"}


def table() -> dict[str, Any]:
    return {"add": {"table": {"family": "inet", "name": "nftsg"}}}


def chain(name: str, **base: Any) -> dict[str, Any]:
    return {"add": {"chain": {**T, "name": name, **base}}}


def rule(chain_name: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": {**T, "chain": chain_name, "expr": list(expr)}}}


def add_set(name: str, type_: Any, *flags: str) -> dict[str, Any]:
    spec: dict[str, Any] = {**T, "name": name, "type": type_}
    if flags:
        spec["flags"] = list(flags)
    return {"add": {"set": spec}}


def add_map(name: str) -> dict[str, Any]:
    return {"add": {"map": {**T, "name": name, "type": "ifname", "map": "verdict"}}}


def elem(verb: str, name: str, *items: Any) -> dict[str, Any]:
    return {verb: {"element": {**T, "name": name, "elem": list(items)}}}


def jump(target: str) -> dict[str, Any]:
    return {"jump": {"target": target}}


def lookup(field: str, set_name: str) -> dict[str, Any]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": field}},
            "right": f"@{set_name}",
        }
    }


def base_program() -> list[dict[str, Any]]:
    return [
        table(),
        chain("in_eni-a"),
        add_set("peers", "ipv4_addr"),
        elem("add", "peers", "10.0.1.10", "10.0.1.11"),
        add_map("ingress_dispatch"),
        elem("add", "ingress_dispatch", ["veth-a", jump("in_eni-a")]),
        chain("forward", type="filter", hook="forward", prio=0, policy="drop"),
        rule(
            "forward", {"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@ingress_dispatch"}}
        ),
        rule("in_eni-a", lookup("saddr", "peers"), {"accept": None}),
    ]


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend([NS])
    backend.apply(NS, base_program())
    return backend


def test_apply_builds_the_table_and_listing_shows_it(fake: FakeBackend) -> None:
    listing = fake.list_table(NS, "inet", "nftsg")
    assert listing is not None
    kinds = [next(iter(item)) for item in listing["nftables"]]
    assert kinds.count("chain") == 2 and kinds.count("rule") == 2
    state = json.loads(fake.dump(NS))["tables"][0]
    assert [c["name"] for c in state["chains"]] == ["forward", "in_eni-a"]
    assert state["chains"][0]["policy"] == "drop"
    peers = next(s for s in state["sets"] if s["name"] == "peers")
    assert peers["elements"] == ["10.0.1.10", "10.0.1.11"]


def test_dump_is_independent_of_creation_order() -> None:
    a, b = FakeBackend([NS]), FakeBackend([NS])
    a.apply(NS, base_program())
    reordered = base_program()
    # Same objects, sets and chains created in another order, elements reversed.
    reordered[1], reordered[2] = reordered[2], reordered[1]
    reordered[3] = elem("add", "peers", "10.0.1.11", "10.0.1.10")
    b.apply(NS, reordered)
    assert a.dump(NS) == b.dump(NS)


def test_failing_last_command_changes_nothing(fake: FakeBackend) -> None:
    before = fake.dump(NS)
    batch = [
        elem("add", "peers", "10.0.1.12"),
        {"flush": {"chain": {**T, "name": "in_eni-a"}}},
        elem("delete", "peers", "192.0.2.1"),  # not there: the kernel says ENOENT
    ]
    with pytest.raises(NftError) as info:
        fake.apply(NS, batch)
    err = info.value
    assert err.rc != 0
    assert "No such file or directory" in err.stderr
    assert err.batch == batch
    assert err.namespace == NS
    assert fake.dump(NS) == before
    assert fake.transactions[-1].ok is False


def test_add_existing_element_is_a_noop_create_is_not(fake: FakeBackend) -> None:
    before = fake.dump(NS)
    fake.apply(NS, [elem("add", "peers", "10.0.1.10")])
    assert fake.dump(NS) == before
    with pytest.raises(NftError, match="transaction failed") as info:
        fake.apply(NS, [elem("create", "peers", "10.0.1.10")])
    assert "File exists" in info.value.stderr


def test_map_key_with_another_value_is_rejected(fake: FakeBackend) -> None:
    fake.apply(NS, [chain("in_eni-b")])
    with pytest.raises(NftError) as info:
        fake.apply(NS, [elem("add", "ingress_dispatch", ["veth-a", jump("in_eni-b")])])
    assert "File exists" in info.value.stderr
    # Changing a map value is delete + add in one batch.
    fake.apply(
        NS,
        [
            elem("delete", "ingress_dispatch", ["veth-a", jump("in_eni-a")]),
            elem("add", "ingress_dispatch", ["veth-a", jump("in_eni-b")]),
        ],
    )
    state = json.loads(fake.dump(NS))["tables"][0]
    dispatch = next(s for s in state["sets"] if s["name"] == "ingress_dispatch")
    assert dispatch["elements"] == [["veth-a", jump("in_eni-b")]]


@pytest.mark.parametrize(
    "command",
    [
        elem("delete", "peers", "198.51.100.1"),
        {"delete": {"chain": {**T, "name": "no-such-chain"}}},
        {"delete": {"set": {**T, "name": "no-such-set"}}},
        {"delete": {"table": {"family": "inet", "name": "other"}}},
        elem("add", "no-such-set", "10.0.0.1"),
        rule("no-such-chain", {"accept": None}),
        rule("in_eni-a", lookup("daddr", "no-such-set"), {"drop": None}),
        rule("in_eni-a", jump("no-such-chain")),
    ],
)
def test_missing_objects_are_rejected(fake: FakeBackend, command: dict[str, Any]) -> None:
    before = fake.dump(NS)
    with pytest.raises(NftError) as info:
        fake.apply(NS, [command])
    assert "No such file or directory" in info.value.stderr
    assert fake.dump(NS) == before


def test_chain_in_use_by_a_map_element_cannot_be_deleted(fake: FakeBackend) -> None:
    with pytest.raises(NftError) as info:
        fake.apply(NS, [{"delete": {"chain": {**T, "name": "in_eni-a"}}}])
    assert "Device or resource busy" in info.value.stderr
    # Removing the reference first, in the same batch, is what the kernel accepts.
    fake.apply(
        NS,
        [
            elem("delete", "ingress_dispatch", ["veth-a", jump("in_eni-a")]),
            {"delete": {"chain": {**T, "name": "in_eni-a"}}},
        ],
    )
    state = json.loads(fake.dump(NS))["tables"][0]
    assert [c["name"] for c in state["chains"]] == ["forward"]


def test_chain_in_use_by_a_jump_cannot_be_deleted(fake: FakeBackend) -> None:
    fake.apply(NS, [chain("helper"), rule("in_eni-a", jump("helper"))])
    with pytest.raises(NftError, match="failed"):
        fake.apply(NS, [{"delete": {"chain": {**T, "name": "helper"}}}])
    fake.apply(
        NS,
        [
            {"flush": {"chain": {**T, "name": "in_eni-a"}}},
            {"delete": {"chain": {**T, "name": "helper"}}},
        ],
    )


def test_set_in_use_by_a_rule_cannot_be_deleted(fake: FakeBackend) -> None:
    with pytest.raises(NftError) as info:
        fake.apply(NS, [{"delete": {"set": {**T, "name": "peers"}}}])
    assert "Device or resource busy" in info.value.stderr
    fake.apply(
        NS,
        [
            {"flush": {"chain": {**T, "name": "in_eni-a"}}},
            {"delete": {"set": {**T, "name": "peers"}}},
        ],
    )


def test_overlapping_interval_elements_are_rejected(fake: FakeBackend) -> None:
    kind = ["inet_proto", "ipv4_addr", "inet_service"]
    fake.apply(
        NS,
        [
            add_set("bucket", kind, "interval"),
            elem(
                "add",
                "bucket",
                {"concat": [6, {"prefix": {"addr": "10.0.1.0", "len": 24}}, {"range": [80, 90]}]},
            ),
        ],
    )
    # Same element again: the kernel accepts it silently.
    fake.apply(
        NS,
        [
            elem(
                "add",
                "bucket",
                {"concat": ["tcp", {"range": ["10.0.1.0", "10.0.1.255"]}, {"range": [80, 90]}]},
            )
        ],
    )
    # Disjoint in one field: fine.
    fake.apply(NS, [elem("add", "bucket", {"concat": [17, "10.0.1.5", {"range": [80, 90]}]})])
    with pytest.raises(NftError) as info:
        fake.apply(NS, [elem("add", "bucket", {"concat": [6, "10.0.1.5", 85]})])
    assert "File exists" in info.value.stderr
    state = json.loads(fake.dump(NS))["tables"][0]
    bucket = next(s for s in state["sets"] if s["name"] == "bucket")
    assert len(bucket["elements"]) == 2


def test_flush_table_empties_chains_but_keeps_elements(fake: FakeBackend) -> None:
    fake.apply(NS, [{"flush": {"table": {"family": "inet", "name": "nftsg"}}}])
    state = json.loads(fake.dump(NS))["tables"][0]
    assert all(c["rules"] == [] for c in state["chains"])
    peers = next(s for s in state["sets"] if s["name"] == "peers")
    assert len(peers["elements"]) == 2


def test_full_resync_idiom_replaces_the_table(fake: FakeBackend) -> None:
    resync = [
        table(),
        {"delete": {"table": {"family": "inet", "name": "nftsg"}}},
        *base_program(),
    ]
    before = fake.dump(NS)
    fake.apply(NS, resync)
    assert fake.dump(NS) == before


def test_check_validates_without_changing(fake: FakeBackend) -> None:
    before = fake.dump(NS)
    fake.check(NS, [elem("add", "peers", "10.0.1.99")])
    assert fake.dump(NS) == before
    with pytest.raises(NftError):
        fake.check(NS, [elem("delete", "peers", "10.0.1.99")])
    assert fake.applied(NS) == [base_program()]


def test_list_and_delete_table(fake: FakeBackend) -> None:
    assert fake.list_table(NS, "inet", "other") is None
    fake.delete_table(NS, "inet", "nftsg")
    fake.delete_table(NS, "inet", "nftsg")
    assert fake.list_table(NS, "inet", "nftsg") is None
    assert json.loads(fake.dump(NS)) == {"tables": []}


def test_unknown_or_root_namespace_is_refused() -> None:
    fake = FakeBackend([NS])
    with pytest.raises(NamespaceNotFound):
        fake.apply("vpc-other", [table()])
    with pytest.raises(NamespaceNotFound):
        fake.add_namespace("")
    with pytest.raises(NamespaceNotFound):
        fake.add_namespace("../etc")


def test_second_identical_sync_is_visible_as_no_transaction(fake: FakeBackend) -> None:
    # What a reconcile loop test asserts: nothing new was applied.
    count = len(fake.applied(NS))
    assert fake.list_table(NS, "inet", "nftsg") is not None
    assert len(fake.applied(NS)) == count == 1


def test_canonical_form_of_real_style_listing() -> None:
    """Kernel listings carry handles, metainfo and protocol names: all normalised."""
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "t", "handle": 3}},
            {
                "set": {
                    "family": "inet",
                    "table": "t",
                    "name": "s",
                    "handle": 1,
                    "type": ["inet_proto", "ipv4_addr"],
                    "flags": ["interval"],
                    "elem": [{"concat": ["tcp", {"prefix": {"addr": "10.0.0.0", "len": 8}}]}],
                }
            },
        ]
    }
    fake = FakeBackend([NS])
    fake.apply(
        NS,
        [
            {"add": {"table": {"family": "inet", "name": "t"}}},
            {
                "add": {
                    "set": {
                        "family": "inet",
                        "table": "t",
                        "name": "s",
                        "type": ["inet_proto", "ipv4_addr"],
                        "flags": ["interval"],
                        "elem": [{"concat": [6, {"range": ["10.0.0.0", "10.255.255.255"]}]}],
                    }
                }
            },
        ],
    )
    assert canonical(listing) == canonical(fake.list_table(NS, "inet", "t"))
