"""The agent survives a failure in every step and keeps the other routers enforced.

Without root: the agent runs on the fake backend with a real SQLite store, a
controllable clock and injected faults in the store, the compiler, the backend
and the flow judge. Each test checks what an operator would: the failing
router keeps its last good rules (never opens), the other routers get the new
model, the agent keeps running, and everything converges once the fault clears.
The same faults against the real kernel are in netns-tests/test_agent_resilience.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nftsg.agent.conntrack import ConntrackError
from nftsg.agent.daemon import Agent, Backoff
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.nft_backend import NftError
from nftsg.agent.settings import Settings
from nftsg.agent.store import Store, StoreError
from nftsg.translators.compiler import KEY_ORDER, compile_vpc
from nftsg.translators.evaluator import Flow
from nftsg.translators.network import Network
from nftsg.translators.nft import Program

PREFIX = "ft"
VPCS = ("vpc-a", "vpc-b")


def topology(port: int) -> dict[str, Any]:
    """Two VPCs, one instance each, whose group lets TCP `port` in."""
    doc: dict[str, Any] = {"vpcs": [], "security_groups": [], "instances": []}
    for n, vpc in enumerate(VPCS, start=1):
        doc["vpcs"].append(
            {
                "vpc_id": vpc,
                "cidr_block": f"10.{n}.0.0/16",
                "vswitches": [{"vswitch_id": f"vsw-{n}", "cidr_block": f"10.{n}.1.0/24"}],
            }
        )
        doc["security_groups"].append(
            {
                "security_group_id": f"sg-{n}",
                "vpc_id": vpc,
                "permissions": [
                    {
                        "direction": "ingress",
                        "ip_protocol": "TCP",
                        "port_range": f"{port}/{port}",
                        "source_cidr_ip": "0.0.0.0/0",
                    }
                ],
            }
        )
        doc["instances"].append(
            {
                "instance_id": f"i-{n}",
                "vswitch_id": f"vsw-{n}",
                "private_ip_address": f"10.{n}.1.10",
                "security_group_ids": [f"sg-{n}"],
            }
        )
    return doc


def ns(vpc: str) -> str:
    return f"{PREFIX}-r-{vpc}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyBackend(FakeBackend):
    """Fails every transaction in the namespaces listed in `failing`."""

    def __init__(self, namespaces: list[str]) -> None:
        super().__init__(namespaces)
        self.failing: set[str] = set()

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        if namespace in self.failing and commands:
            raise NftError(
                "nft transaction failed",
                rc=1,
                stderr="Error: injected",
                batch=commands,
                namespace=namespace,
            )
        super().apply(namespace, commands)


class FlakyStore(Store):
    """A real store whose reads and writes can be made to fail."""

    failing = False

    def _fail(self) -> None:
        if self.failing:
            raise StoreError("injected: database is locked")

    def revision(self) -> int:
        self._fail()
        return super().revision()

    def load(self) -> Any:
        self._fail()
        return super().load()

    def record_applied(self, namespace: str, revision: int, topology_digest: str) -> None:
        self._fail()
        super().record_applied(namespace, revision, topology_digest)


class Faults:
    def __init__(self) -> None:
        self.compile_failing: set[str] = set()
        self.judge_failing = False
        self.judged: list[str] = []

    def compile(self, network: Network, vpc_id: str, table: str, bit: int) -> Program:
        if vpc_id in self.compile_failing:
            raise RuntimeError(f"injected compiler bug for {vpc_id}")
        return compile_vpc(network, vpc_id, table, ct_mark_bit=bit)

    def judge(self, namespace: str, allowed: Callable[[Flow], bool], bit: int) -> int:
        if self.judge_failing:
            raise ConntrackError("injected: cannot list conntrack entries", namespace=namespace)
        self.judged.append(namespace)
        return 0


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.faults = Faults()
        self.backend = FlakyBackend([ns(v) for v in VPCS])
        self.store = FlakyStore(tmp_path / "state.db")
        self.writer = Store(tmp_path / "state.db")
        settings = Settings(state_dir=tmp_path, prefix=PREFIX, table="nftsg")
        self.agent = Agent(
            settings,
            backend=self.backend,
            store=self.store,
            namespace_exists=lambda _ns: True,
            judge_flows=self.faults.judge,
            list_flows=None,
            compile_program=self.faults.compile,
            verify_every=5.0,
            backoff=Backoff(first=1.0, cap=8.0),
            clock=self.clock,
        )

    def save(self, port: int) -> int:
        return self.writer.save_topology(topology(port))

    def ports_in_force(self, vpc: str) -> set[int]:
        """The TCP ports the router's table lets in, read from the fake kernel's elements."""
        listing = self.backend.list_table(ns(vpc), "inet", "nftsg")
        assert listing is not None, f"no table in {ns(vpc)}"
        ports = set()
        for item in listing["nftables"]:
            body = item.get("set")
            if body and "_in_" in body["name"]:
                for elem in body.get("elem", []):
                    dport = elem["concat"][KEY_ORDER.index(2)]  # the dport field
                    ports.add(dport if isinstance(dport, int) else dport["range"][0])
        return ports

    def rounds(self, n: int = 1, every: float = 0.1) -> None:
        for _ in range(n):
            self.agent.step()  # must never raise
            self.clock.advance(every)

    def close(self) -> None:
        self.agent.close()
        self.writer.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def in_force_everywhere(rig: Rig, port: int) -> None:
    for vpc in VPCS:
        assert rig.ports_in_force(vpc) == {port}, vpc
        record = rig.writer.applied(ns(vpc))
        assert record is not None and record.revision == rig.writer.revision()


def test_idle_rounds_load_nothing(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.save(22)
    rig.rounds(2)
    in_force_everywhere(rig, 22)
    loads = []
    original = rig.store.load
    monkeypatch.setattr(rig.store, "load", lambda: loads.append(1) or original())
    sent = len(rig.backend.transactions)
    rig.rounds(50)
    assert loads == [] and len(rig.backend.transactions) == sent
    rig.save(23)
    rig.rounds(1)
    assert loads == [1]
    in_force_everywhere(rig, 23)


def test_backend_failure_in_one_router_leaves_the_others_enforced(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    in_force_everywhere(rig, 22)
    rig.backend.failing.add(ns("vpc-a"))
    rig.save(80)
    rig.rounds(3)
    assert rig.ports_in_force("vpc-a") == {22}  # last good rules, not open
    assert rig.ports_in_force("vpc-b") == {80}
    assert rig.agent.routers[ns("vpc-a")].failures >= 1
    assert rig.agent.counters["failures.apply"] >= 1
    # Retries back off: within the first delay nothing more is tried.
    tried = rig.agent.counters["failures.apply"]
    rig.rounds(3, every=0.1)
    assert rig.agent.counters["failures.apply"] == tried
    rig.backend.failing.clear()
    rig.clock.advance(10)
    rig.rounds(1)
    in_force_everywhere(rig, 80)
    # The failed router got a full resync (add, delete, re-create of its table).
    last = [t for t in rig.backend.transactions if t.namespace == ns("vpc-a")][-1]
    assert last.commands[1] == {"delete": {"table": {"family": "inet", "name": "nftsg"}}}
    # vpc-b was not resynced in full for vpc-a's failure.
    b_full = [
        t
        for t in rig.backend.transactions
        if t.namespace == ns("vpc-b") and len(t.commands) > 1 and "delete" in t.commands[1]
    ]
    assert len(b_full) == 1  # only its first load


def test_compile_failure_in_one_router(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    rig.faults.compile_failing.add("vpc-b")
    rig.save(443)
    rig.rounds(3)
    assert rig.ports_in_force("vpc-a") == {443}
    assert rig.ports_in_force("vpc-b") == {22}
    assert rig.agent.counters["failures.compile"] >= 1
    rig.faults.compile_failing.clear()
    rig.clock.advance(10)
    rig.rounds(1)
    in_force_everywhere(rig, 443)


def test_store_failure_keeps_enforcing_and_recovers(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    rig.store.failing = True
    rig.save(8080)  # written by another process; this agent cannot read it yet
    rig.rounds(5)
    for vpc in VPCS:
        assert rig.ports_in_force(vpc) == {22}
    assert rig.agent.counters["failures.store"] >= 5
    rig.store.failing = False
    rig.rounds(1)
    in_force_everywhere(rig, 8080)


def test_store_write_failure_after_commit_is_recorded_later(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    rig.store.failing = True
    # Only the record fails (the revision read works), so simulate a model change
    # reaching the agent before the store breaks.
    rig.save(25)
    rig.store.failing = False
    original = rig.store.record_applied
    calls = []

    def failing_record(*args: Any) -> None:
        calls.append(args)
        if len(calls) <= 2:
            raise StoreError("injected: disk I/O error")
        original(*args)

    rig.store.record_applied = failing_record  # type: ignore[method-assign]
    rig.rounds(1)
    for vpc in VPCS:
        assert rig.ports_in_force(vpc) == {25}  # in force although not recorded
    rig.rounds(1)
    in_force_everywhere(rig, 25)


def test_flow_judging_failure_never_undoes_the_commit(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    rig.faults.judge_failing = True
    rig.save(53)
    rig.rounds(3)
    for vpc in VPCS:
        assert rig.ports_in_force(vpc) == {53}  # the new rules are in force
        assert rig.agent.routers[ns(vpc)].unjudged
    assert rig.agent.counters["failures.flows"] >= 2
    rig.faults.judge_failing = False
    judged_before = len(rig.faults.judged)
    rig.clock.advance(10)
    rig.rounds(1)
    assert len(rig.faults.judged) == judged_before + 2  # retried in both routers
    assert not any(r.unjudged for r in rig.agent.routers.values())
    sent = len(rig.backend.transactions)
    rig.rounds(3)
    assert len(rig.backend.transactions) == sent  # the retry judged flows, sent no rules


def test_invalid_stored_model_keeps_the_last_good_one(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    bad = topology(22)
    bad["instances"][0]["security_group_ids"] = ["sg-missing"]
    rig.writer.save_topology(bad)
    rig.rounds(3)
    in_force_everywhere_but_recorded = [rig.ports_in_force(v) for v in VPCS]
    assert in_force_everywhere_but_recorded == [{22}, {22}]
    assert rig.agent.counters["failures.load"] == 1  # backing off, not retried every round
    rig.save(24)
    rig.rounds(1)
    in_force_everywhere(rig, 24)


def test_unexpected_exception_in_a_round_does_not_stop_the_loop(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rig.save(22)
    calls = {"n": 0}
    original = rig.agent.step

    def exploding_step() -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("injected")
        if calls["n"] >= 3:
            rig.agent.stop_event.set()
        return original()

    monkeypatch.setattr(rig.agent, "step", exploding_step)
    rig.agent.poll_interval = 0.0
    rig.agent.backoff = Backoff(first=0.01, cap=0.01)
    with caplog.at_level(logging.ERROR):
        rig.agent.run()
    assert calls["n"] >= 3
    assert "failed unexpectedly" in caplog.text
    for vpc in VPCS:
        assert rig.ports_in_force(vpc) == {22}


def test_drift_is_repaired_and_other_routers_untouched(rig: Rig) -> None:
    rig.save(22)
    rig.rounds(1)
    # Someone flips vpc-a's forward policy to accept behind the agent's back.
    rig.backend.apply(
        ns("vpc-a"),
        [
            {
                "add": {
                    "chain": {
                        "family": "inet",
                        "table": "nftsg",
                        "name": "forward",
                        "type": "filter",
                        "hook": "forward",
                        "prio": 0,
                        "policy": "accept",
                    }
                }
            }
        ],
    )
    sent_b = len([t for t in rig.backend.transactions if t.namespace == ns("vpc-b")])
    rig.clock.advance(6)
    rig.rounds(2)
    assert rig.agent.counters["drift_repairs"] == 1
    listing = rig.backend.list_table(ns("vpc-a"), "inet", "nftsg")
    assert listing is not None
    forward = next(
        i["chain"] for i in listing["nftables"] if i.get("chain", {}).get("name") == "forward"
    )
    assert forward["policy"] == "drop"
    assert len([t for t in rig.backend.transactions if t.namespace == ns("vpc-b")]) == sent_b


class Running:
    """The agent's real loop in a thread (real time, short intervals)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.messages: list[str] = []
        agent = rig.agent
        agent.clock = time.monotonic
        agent.poll_interval = 0.01
        agent.backoff = Backoff(first=0.05, cap=0.1)
        agent.notify = self.messages.append
        agent.watchdog_every = 0.02
        self.thread = threading.Thread(target=agent.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rig.agent.stop_event.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    def wait_for(self, what: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return True
            time.sleep(0.01)
        return False

    def ready(self) -> list[str]:
        return [m for m in self.messages if m.startswith("READY=1")]


def test_ready_only_once_every_router_is_in_force(rig: Rig) -> None:
    rig.backend.failing.add(ns("vpc-b"))
    rig.save(22)
    with Running(rig) as run:
        assert run.wait_for(lambda: rig.agent.counters["failures.apply"] >= 2)
        assert run.ready() == []  # vpc-b is not enforced: not ready
        assert rig.ports_in_force("vpc-a") == {22}
        rig.backend.failing.clear()
        assert run.wait_for(lambda: bool(run.ready()))
        in_force_everywhere(rig, 22)
        assert "all in force" in run.ready()[0]
        # The watchdog is fed by the loop.
        fed = sum(m.startswith("WATCHDOG=1") for m in run.messages)
        assert run.wait_for(lambda: sum(m.startswith("WATCHDOG=1") for m in run.messages) > fed)
    assert run.messages[-1] == "STOPPING=1"


def test_a_hung_round_stops_feeding_the_watchdog(rig: Rig) -> None:
    rig.save(22)
    release = threading.Event()
    with Running(rig) as run:
        assert run.wait_for(lambda: bool(run.ready()))
        original = rig.agent.step

        def hung_step() -> bool:
            release.wait(10)
            return original()

        rig.agent.step = hung_step  # type: ignore[method-assign]
        time.sleep(0.1)  # let the current round finish and the next one hang
        fed = len(run.messages)
        time.sleep(0.3)
        assert len(run.messages) == fed  # no WATCHDOG=1 while the round hangs
        release.set()
        assert run.wait_for(lambda: len(run.messages) > fed)


def test_reload_rewrites_every_router_in_full(rig: Rig) -> None:
    rig.save(22)
    reloaded = []
    rig.agent.on_reload = lambda: reloaded.append(1)
    with Running(rig) as run:
        assert run.wait_for(lambda: bool(run.ready()))
        sent = len(rig.backend.transactions)
        rig.agent.reload_event.set()
        assert run.wait_for(lambda: len(run.ready()) == 2)
        assert reloaded == [1]
        assert "RELOADING=1" in run.messages
        rewrites = rig.backend.transactions[sent:]
        assert sorted(t.namespace for t in rewrites) == sorted(ns(v) for v in VPCS)
        assert all(t.commands[1].get("delete") for t in rewrites)  # whole-table rewrites
        in_force_everywhere(rig, 22)
