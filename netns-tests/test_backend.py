"""The real nft backend against the kernel, in scratch namespaces."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nftsg.agent.fake_backend import FakeBackend, canonical, canonical_text
from nftsg.agent.nft_backend import NamespaceNotFound, NftBackend, NftError

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

FAMILY, TABLE = "inet", "nftsg"
T = {"family": FAMILY, "table": TABLE}


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    """Three fresh namespaces with a per-run prefix, always removed."""
    prefix = "nt" + secrets.token_hex(3)
    names = [f"{prefix}-{i}" for i in range(3)]
    made: list[str] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def backend() -> Iterator[NftBackend]:
    b = NftBackend()
    yield b
    b.close()


def nft_text(ns: str) -> str:
    """What an operator sees: `nft list ruleset` in the namespace."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def program(peers: list[Any], ports: list[int]) -> list[dict[str, Any]]:
    """A small program in the compiler's shape: dispatch map, per-ENI chain, sets."""
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": {**T, "name": "peers", "type": "ipv4_addr", "flags": ["interval"]}}},
        {"add": {"set": {**T, "name": "ports", "type": "inet_service"}}},
        {"add": {"chain": {**T, "name": "in_eni-a"}}},
        {"add": {"map": {**T, "name": "ingress_dispatch", "type": "ifname", "map": "verdict"}}},
        {
            "add": {
                "chain": {
                    **T,
                    "name": "forward",
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "drop",
                }
            }
        },
        *([{"add": {"element": {**T, "name": "peers", "elem": peers}}}] if peers else []),
        *([{"add": {"element": {**T, "name": "ports", "elem": ports}}}] if ports else []),
        {
            "add": {
                "element": {
                    **T,
                    "name": "ingress_dispatch",
                    "elem": [["veth-a", {"jump": {"target": "in_eni-a"}}]],
                }
            }
        },
        {
            "add": {
                "rule": {
                    **T,
                    "chain": "forward",
                    "expr": [
                        {
                            "vmap": {
                                "key": {"meta": {"key": "oifname"}},
                                "data": "@ingress_dispatch",
                            }
                        }
                    ],
                }
            }
        },
        {
            "add": {
                "rule": {
                    **T,
                    "chain": "in_eni-a",
                    "expr": [
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                "right": "@peers",
                            }
                        },
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                "right": "@ports",
                            }
                        },
                        {"accept": None},
                    ],
                }
            }
        },
        {"add": {"rule": {**T, "chain": "in_eni-a", "expr": [{"drop": None}]}}},
    ]


def prefix(cidr: str) -> dict[str, Any]:
    addr, length = cidr.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def elem(verb: str, name: str, *items: Any) -> dict[str, Any]:
    return {verb: {"element": {**T, "name": name, "elem": list(items)}}}


def test_apply_is_atomic_and_failure_keeps_last_good_ruleset(
    namespaces: list[str], backend: NftBackend
) -> None:
    ns = namespaces[0]
    backend.apply(ns, program([prefix("10.0.1.0/24")], [22, 80]))
    good = nft_text(ns)
    assert "ip saddr @peers tcp dport @ports accept" in good
    listing = backend.list_table(ns, FAMILY, TABLE)
    assert listing is not None
    assert canonical(listing)["tables"][0]["name"] == TABLE

    # Valid changes followed by one the kernel rejects (element not there).
    batch = [
        elem("add", "peers", prefix("192.0.2.0/24")),
        {"flush": {"chain": {**T, "name": "in_eni-a"}}},
        elem("delete", "ports", 443),
    ]
    with pytest.raises(NftError) as info:
        backend.apply(ns, batch)
    err = info.value
    assert err.rc != 0
    assert "No such file or directory" in err.stderr
    assert err.batch == batch
    assert err.namespace == ns
    assert nft_text(ns) == good
    assert backend.list_table(ns, FAMILY, TABLE) == listing


def test_check_is_a_dry_run(namespaces: list[str], backend: NftBackend) -> None:
    ns = namespaces[0]
    backend.apply(ns, program([prefix("10.0.1.0/24")], [80]))
    before = nft_text(ns)
    backend.check(ns, [elem("add", "ports", 8080)])
    assert nft_text(ns) == before
    with pytest.raises(NftError):
        backend.check(ns, [elem("delete", "ports", 8080)])


def test_list_and_delete_table(namespaces: list[str], backend: NftBackend) -> None:
    ns = namespaces[0]
    assert backend.list_table(ns, FAMILY, TABLE) is None
    backend.delete_table(ns, FAMILY, TABLE)  # absent: fine
    backend.apply(ns, program([], []))
    # A table that is not ours must survive.
    subprocess.run(["ip", "netns", "exec", ns, "nft", "add table ip other"], check=True)
    backend.delete_table(ns, FAMILY, TABLE)
    backend.delete_table(ns, FAMILY, TABLE)
    assert backend.list_table(ns, FAMILY, TABLE) is None
    assert nft_text(ns).strip() == "table ip other {\n}"


def test_missing_namespace_is_never_created(backend: NftBackend) -> None:
    name = "nt" + secrets.token_hex(3) + "-missing"
    with pytest.raises(NamespaceNotFound):
        backend.apply(name, program([], []))
    assert not os.path.exists(f"/run/netns/{name}")
    with pytest.raises(NamespaceNotFound):
        backend.apply("", program([], []))


def test_deleted_namespace_is_detected(namespaces: list[str], backend: NftBackend) -> None:
    ns = namespaces[2]
    backend.apply(ns, program([], []))
    subprocess.run(["ip", "netns", "del", ns], check=True)
    try:
        with pytest.raises(NamespaceNotFound):
            backend.apply(ns, [elem("add", "ports", 1)])
    finally:
        subprocess.run(["ip", "netns", "add", ns], check=True)  # the fixture removes it


def test_namespaces_are_served_concurrently(namespaces: list[str], backend: NftBackend) -> None:
    a, b = namespaces[0], namespaces[1]
    errors: list[BaseException] = []

    def work(ns: str, port: int) -> None:
        try:
            backend.apply(ns, program([], []))
            for i in range(30):
                backend.apply(ns, [elem("add", "ports", port + i)])
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(a, 1000)),
        threading.Thread(target=work, args=(b, 2000)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ports = {}
    for ns in (a, b):
        listing = canonical(backend.list_table(ns, FAMILY, TABLE))
        ports[ns] = next(s for s in listing["tables"][0]["sets"] if s["name"] == "ports")
    assert ports[a]["elements"] == list(range(1000, 1030))
    assert ports[b]["elements"] == list(range(2000, 2030))


def test_real_and_fake_agree(namespaces: list[str], backend: NftBackend) -> None:
    ns = namespaces[0]
    fake = FakeBackend([ns])
    batches: list[list[dict[str, Any]]] = [
        program([prefix("10.0.1.0/24"), "10.0.2.7"], [22]),
        [elem("add", "peers", prefix("10.0.3.0/25")), elem("add", "ports", 443)],
        [elem("add", "ports", 443)],  # already there: accepted by both
        [elem("add", "peers", prefix("10.0.3.0/24"))],  # overlaps: rejected by both
        [{"delete": {"set": {**T, "name": "ports"}}}],  # in use: rejected by both
        [
            {"add": {"chain": {**T, "name": "in_eni-b"}}},
            elem("delete", "ingress_dispatch", ["veth-a", {"jump": {"target": "in_eni-a"}}]),
            elem("add", "ingress_dispatch", ["veth-a", {"jump": {"target": "in_eni-b"}}]),
            {"delete": {"chain": {**T, "name": "in_eni-a"}}},
        ],
        [elem("delete", "peers", "10.0.2.7"), elem("delete", "peers", "10.0.9.9")],
        program([prefix("10.0.5.0/24")], [80, 8080]),
    ]
    for batch in batches:
        outcomes = []
        for b in (backend, fake):
            try:
                b.apply(ns, batch)
                outcomes.append("ok")
            except NftError:
                outcomes.append("rejected")
        assert outcomes[0] == outcomes[1], batch
        assert canonical_text(backend.list_table(ns, FAMILY, TABLE)) == fake.dump(ns)


def test_large_load_and_small_change_timings(namespaces: list[str], backend: NftBackend) -> None:
    """40k rules in 200 chains reachable from a verdict map, then a one-element change."""
    ns = namespaces[0]
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"map": {**T, "name": "dispatch", "type": "ifname", "map": "verdict"}}},
        {"add": {"set": {**T, "name": "peers", "type": "ipv4_addr"}}},
        {
            "add": {
                "chain": {
                    **T,
                    "name": "forward",
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "drop",
                }
            }
        },
    ]
    for c in range(200):
        cmds.append({"add": {"chain": {**T, "name": f"in_{c}"}}})
        cmds.append(elem("add", "dispatch", [f"veth{c}", {"jump": {"target": f"in_{c}"}}]))
        for r in range(200):
            cmds.append(
                {
                    "add": {
                        "rule": {
                            **T,
                            "chain": f"in_{c}",
                            "expr": [
                                {
                                    "match": {
                                        "op": "==",
                                        "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                        "right": 1000 + r,
                                    }
                                },
                                {"accept": None},
                            ],
                        }
                    }
                }
            )
    cmds.append(
        {
            "add": {
                "rule": {
                    **T,
                    "chain": "forward",
                    "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@dispatch"}}],
                }
            }
        }
    )
    started = time.perf_counter()
    backend.apply(ns, cmds)
    full = time.perf_counter() - started
    started = time.perf_counter()
    backend.apply(ns, [elem("add", "peers", "10.0.0.1")])
    one = time.perf_counter() - started
    started = time.perf_counter()
    backend.apply(
        ns,
        [
            {"flush": {"chain": {**T, "name": "in_7"}}},
            *[c for c in cmds if c.get("add", {}).get("rule", {}).get("chain") == "in_7"],
        ],
    )
    chain = time.perf_counter() - started
    print(
        f"\n40k-rule load {full:.2f}s, one element {one * 1000:.1f}ms, "
        f"one chain {chain * 1000:.1f}ms"
    )
    assert nft_text(ns).count("accept") >= 40000
    assert one < 0.5 and chain < 2.0


def test_text_load_runs_in_the_namespace_and_fails_whole(
    namespaces: list[str], backend: NftBackend
) -> None:
    """A full load as nft text (by the `nft` program, a child of the namespace's
    worker) lands in that namespace only, and a batch the kernel rejects changes
    nothing there."""
    ns, other = namespaces[0], namespaces[1]
    good = (
        f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
        f"table {FAMILY} {TABLE} {{\n set s {{ type ipv4_addr; flags interval; "
        "elements = { 10.0.0.0/8, 192.0.2.1 } }\n"
        " chain forward {\n  type filter hook forward priority 0; policy drop;\n"
        "  ip saddr @s accept\n }\n}\n"
    )
    backend.apply_text(ns, good, 4)
    loaded = nft_text(ns)
    assert "ip saddr @s accept" in loaded and "10.0.0.0/8" in loaded
    assert "nftsg" not in nft_text(other)
    bad = good.replace("192.0.2.1", "192.0.2.1, 10.1.0.0/16")  # overlaps 10.0.0.0/8
    with pytest.raises(NftError) as info:
        backend.apply_text(ns, bad, 4)
    assert info.value.rc != 0 and info.value.stderr
    assert info.value.namespace == ns
    assert nft_text(ns) == loaded


def test_streamed_listing_equals_the_whole_listing(
    namespaces: list[str], backend: NftBackend
) -> None:
    """`table_items` (the table without elements, then set by set) yields what one
    whole-table listing holds, in its order; None for an absent table."""
    ns = namespaces[0]
    assert backend.table_items(ns, FAMILY, TABLE) is None
    backend.apply(ns, program([prefix("10.0.1.0/24"), "192.0.2.7"], [22, 80, 443]))
    items = backend.table_items(ns, FAMILY, TABLE)
    assert items is not None
    whole = backend._list_whole(ns, FAMILY, TABLE)
    assert whole is not None
    assert list(items) == whole["nftables"]
    assert any("elem" in i.get("set", {}) for i in whole["nftables"])


def test_commits_of_the_nft_children_are_the_agents_own(
    namespaces: list[str], backend: NftBackend
) -> None:
    """A full load committed by an nft child of the backend is not reported as another
    process's commit (it would trigger a drift check after every full load); one by
    an operator's nft is."""
    from nftsg.agent.events import TableEvents

    ns = namespaces[0]
    events = TableEvents()
    try:
        events.watch([ns])
        deadline = time.monotonic() + 10
        while ns not in events.watching() and time.monotonic() < deadline:
            time.sleep(0.02)  # the subscription is opened by the events thread
        backend.apply_text(ns, f"add table {FAMILY} {TABLE}\n", 1)
        subprocess.run(["ip", "netns", "exec", ns, "nft", "add table ip other"], check=True)
        while events.seen == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert events.seen == 1
        assert events.own >= 1
        assert events.changed() == {ns}
    finally:
        events.close()
