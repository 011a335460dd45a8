"""Element batches over nfnetlink (agent/nft_fastpath.py) against libnftables, on the
real kernel.

Twin namespaces get the same compiled program (plain and with hit counters: every
set type the layout uses: the 5-field interval sets of both families, counted or
not, `ports`, `port_addrs_*`, `intra_*`, the dispatch verdict maps); then the same
random element batches go to one through the netlink path and to the other through
libnftables, and `nft -j list table` must be equal after each. A batch the kernel
refuses (overlap, missing set, missing element) fails whole on the netlink path and
changes nothing. The commit is recognised as the agent's own in the event stream.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nftsg.agent import events
from nftsg.agent.nft_backend import NftBackend, NftError
from nftsg.translators.compiler import compile_vpc
from nftsg.translators.nft import Key, NftMap, NftSet, Program, Span, Writer
from nftsg.translators.validate import load_network
from test_compiler import scale_topology

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"
    ),
]

TABLE = "nftsg"


def listing(ns: str) -> list[Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", TABLE],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [i for i in json.loads(out)["nftables"] if "metainfo" not in i]


@pytest.fixture
def twins(run_prefix: str) -> Iterator[tuple[str, str]]:
    names = [f"{run_prefix}nl{secrets.token_hex(3)}{side}" for side in "ab"]
    made = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
        yield names[0], names[1]
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def backends() -> Iterator[tuple[NftBackend, NftBackend]]:
    fast, slow = NftBackend(netlink_elements=True), NftBackend(netlink_elements=False)
    yield fast, slow
    fast.close()
    slow.close()


def small_program(counters: bool) -> Program:
    network = load_network(json.dumps(scale_topology(12, 16, 12, seed=3)))
    (vpc,) = sorted(network.vpcs)
    return compile_vpc(network, vpc, TABLE, counters=counters)


def _overlaps(a: Key, b: Key) -> bool:
    return all(
        x.lo <= y.hi and y.lo <= x.hi
        for x, y in zip(a, b, strict=True)
        if isinstance(x, Span) and isinstance(y, Span)
    )


def _random_atom(rng: random.Random, type_: str) -> Span | str:
    if type_ == "ifname":
        return "r" + "".join(rng.choice("0123456789abcdef") for _ in range(8))
    if type_ == "ipv4_addr":
        lo = rng.getrandbits(32)
        size = rng.choice([0, 0, 255, 3, 1 << 16])  # a point, a /24, a range, a /16
        lo &= ~size if size & (size + 1) == 0 else 0xFFFFFFFF
        return Span(lo, min(lo + size, (1 << 32) - 1))
    if type_ == "ipv6_addr":
        lo = rng.getrandbits(128)
        size = rng.choice([0, (1 << 64) - 1, 41])
        lo &= ~size if size & (size + 1) == 0 else (1 << 128) - 1
        return Span(lo, min(lo + size, (1 << 128) - 1))
    if type_ == "inet_proto":
        p = rng.choice([1, 6, 17, 47, 58, 132])
        return Span(p, p)
    lo = rng.randrange(65536)
    return Span(lo, min(65535, lo + rng.choice([0, 0, 9, 1000])))


class State:
    """The elements of every set and map as the batches leave them."""

    def __init__(self, program: Program) -> None:
        self.sets: dict[str, NftSet] = {s.name: s for s in program.sets}
        self.maps: dict[str, NftMap] = {m.name: m for m in program.maps}
        self.elements: dict[str, set[Any]] = {s.name: set(s.elements) for s in program.sets}
        self.items: dict[str, dict[Key, Any]] = {m.name: dict(m.elements) for m in program.maps}
        self.chains = [c.name for c in program.chains if c.base is None]
        self.writer = Writer(program.family, program.table)

    def random_batch(self, rng: random.Random) -> list[dict[str, Any]]:
        w = self.writer
        deletes: list[dict[str, Any]] = []
        adds: list[dict[str, Any]] = []
        for name in rng.sample(sorted(self.sets), k=min(6, len(self.sets))):
            s = self.sets[name]
            have = self.elements[name]
            gone = rng.sample(sorted(have), k=min(len(have), rng.choice([0, 1, 3])))
            keep = have - set(gone)
            new: list[Key] = []
            for _ in range(rng.choice([1, 2, 5])):
                for _attempt in range(50):
                    key = tuple(_random_atom(rng, t) for t in s.type)
                    interval = "interval" in s.flags
                    if interval and any(_overlaps(key, k) for k in [*keep, *new]):
                        continue
                    if not interval and any(isinstance(a, Span) and a.lo != a.hi for a in key):
                        continue
                    if key not in keep and key not in new:
                        new.append(key)
                        break
            if gone:
                deletes.append(w.delete_elements(name, w.set_elements(s.type, sorted(gone))))
            if new:
                adds.append(w.add_elements(name, w.set_elements(s.type, sorted(new))))
            self.elements[name] = keep | set(new)
        for name in sorted(self.maps):
            m = self.maps[name]
            items = self.items[name]
            gone_keys = rng.sample(sorted(items), k=min(len(items), rng.choice([0, 1, 2])))
            for k in gone_keys:
                del items[k]
            fresh = [((_random_atom(rng, "ifname"),), rng.choice(self.chains)) for _ in range(2)]
            if gone_keys:
                deletes.append(w.delete_elements(name, w.set_elements(m.type, gone_keys)))
            if self.chains:
                rendered = [
                    [w.set_elements(m.type, [k])[0], {"jump": {"target": c}}] for k, c in fresh
                ]
                adds.append({"add": {"element": w._obj(name=name, elem=rendered)}})
        return deletes + adds


@pytest.mark.parametrize("counters", [False, True])
def test_random_element_batches_list_the_same_as_libnftables(
    twins: tuple[str, str], backends: tuple[NftBackend, NftBackend], counters: bool
) -> None:
    fast_ns, slow_ns = twins
    fast, slow = backends
    program = small_program(counters)
    kinds = {(s.type, s.flags, s.counter) for s in program.sets}
    assert len(kinds) >= 5 and program.maps  # the layout's set types are all here
    for backend, ns in ((fast, fast_ns), (slow, slow_ns)):
        backend.apply(ns, program.full_sync_commands())
        assert backend.last_path[ns] == "libnftables"  # tables and sets: not elements
    assert listing(fast_ns) == listing(slow_ns)
    state = State(program)
    rng = random.Random(11 if counters else 5)
    for _round in range(6):
        batch = state.random_batch(rng)
        assert batch
        fast.apply(fast_ns, batch)
        assert fast.last_path[fast_ns] == "netlink"
        slow.apply(slow_ns, batch)
        assert slow.last_path[slow_ns] == "libnftables"
        got, want = listing(fast_ns), listing(slow_ns)
        assert got == want


def _loaded(twins: tuple[str, str], fast: NftBackend) -> tuple[str, Program]:
    ns = twins[0]
    program = small_program(False)
    fast.apply(ns, program.full_sync_commands())
    return ns, program


def _interval_set(program: Program) -> NftSet:
    return next(
        s
        for s in program.sets
        if "interval" in s.flags
        and any(a.lo < a.hi for e in s.elements for a in e if isinstance(a, Span))
    )


def test_overlapping_element_fails_the_whole_batch(
    twins: tuple[str, str], backends: tuple[NftBackend, NftBackend]
) -> None:
    fast, slow = backends
    ns, program = _loaded(twins, fast)
    w = Writer(program.family, program.table)
    s = _interval_set(program)
    box = next(e for e in s.elements if any(a.lo < a.hi for a in e if isinstance(a, Span)))
    field = next(n for n, a in enumerate(box) if isinstance(a, Span) and a.lo < a.hi)
    # Inside an element, sharing its first key: the kernel refuses the overlap.
    inner = tuple(Span(a.lo, a.lo) if n == field else a for n, a in enumerate(box))
    before = listing(ns)
    batch = [
        w.add_elements("ports", w.set_elements(("ifname",), [("fresh0",)])),
        w.add_elements(s.name, w.set_elements(s.type, [inner])),
    ]
    with pytest.raises(NftError) as failed:
        fast.apply(ns, batch)
    assert fast.last_path.get(ns) == "libnftables"  # the load; no netlink commit
    assert "element message 2 of 2" in failed.value.stderr
    assert listing(ns) == before
    # libnftables refuses the same batch in the twin (same verdict, both ways).
    slow.apply(twins[1], program.full_sync_commands())
    with pytest.raises(NftError):
        slow.apply(twins[1], batch)


def test_missing_set_or_element_fails_and_changes_nothing(
    twins: tuple[str, str], backends: tuple[NftBackend, NftBackend]
) -> None:
    fast, _slow = backends
    ns, program = _loaded(twins, fast)
    w = Writer(program.family, program.table)
    before = listing(ns)
    good = w.add_elements("ports", w.set_elements(("ifname",), [("fresh1",)]))
    for bad in (
        w.add_elements("no_such_set", w.set_elements(("ifname",), [("x",)])),
        w.delete_elements("ports", w.set_elements(("ifname",), [("not_there",)])),
    ):
        with pytest.raises(NftError) as failed:
            fast.apply(ns, [good, bad])
        assert "No such file or directory" in failed.value.stderr
        assert failed.value.batch == [good, bad]
        assert listing(ns) == before
    fast.apply(ns, [good])  # the good half alone goes through
    assert fast.last_path[ns] == "netlink"
    assert listing(ns) != before


def test_unsupported_batches_go_whole_through_libnftables(
    twins: tuple[str, str], backends: tuple[NftBackend, NftBackend]
) -> None:
    fast, _slow = backends
    ns, program = _loaded(twins, fast)
    w = Writer(program.family, program.table)
    # An element with a comment is not encoded here: the batch (elements only) goes
    # to libnftables whole, and what it does there is what it always did.
    fast.apply(ns, [w.add_elements("ports", ["fresh2", {"elem": {"val": "c", "comment": "x"}}])])
    assert fast.last_path[ns] == "libnftables"
    names = [
        e
        for i in listing(ns)
        if "set" in i and i["set"]["name"] == "ports"
        for e in i["set"].get("elem", [])
    ]
    assert "fresh2" in names and {"elem": {"val": "c", "comment": "x"}} in names


def _commits(sock: Any) -> list[events.Commit]:
    """The commits announced so far (one datagram per notification; the kernel
    queues them before the committing call returns)."""
    found: list[events.Commit] = []
    while True:
        try:
            found.extend(events.parse_commits(sock.recv(1 << 20)))
        except BlockingIOError:
            return found


def test_netlink_commit_is_the_agents_own_event(
    twins: tuple[str, str], backends: tuple[NftBackend, NftBackend]
) -> None:
    fast, _slow = backends
    ns, program = _loaded(twins, fast)
    w = Writer(program.family, program.table)
    sock = events.open_socket(ns, events.NETLINK_NETFILTER, events.NFNLGRP_NFTABLES)
    try:
        gen = fast.generation(ns)
        fast.apply(ns, [w.add_elements("ports", w.set_elements(("ifname",), [("fresh3",)]))])
        assert fast.last_path[ns] == "netlink"
        assert fast.generation(ns) == gen + 1  # one transaction
        commits = _commits(sock)
        # Another process's commit is not ours: `nft` run beside the agent.
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "nft",
                "add",
                "element",
                "inet",
                TABLE,
                "ports",
                '{ "fresh4" }',
            ],
            check=True,
        )
        theirs = _commits(sock)
    finally:
        sock.close()
    assert [c.generation for c in commits] == [gen + 1]
    assert commits[0].pid is not None and events.is_own_thread(commits[0].pid)
    assert theirs and not any(c.pid is not None and events.is_own_thread(c.pid) for c in theirs)
