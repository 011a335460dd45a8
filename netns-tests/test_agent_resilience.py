"""The agent on the real kernel: a fault in one step of one router never opens it, never
stops the agent, never blocks the other routers, and clears by itself.

Two VPC routers, each with a client and a server. The model first lets TCP 22
in, then moves the allowed port to 80 while a fault is injected (in the store,
the compiler, the nft backend or the flow judge). Real probes check what the
kernel enforces: the faulty router keeps its last good rules (22 open, 80
closed: it never opens), the healthy router has the new rules, and once the
fault clears the faulty router converges. Unit-level variants on the fake
backend are in tests/test_agent_faults.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nftsg.agent.conntrack import ConntrackError, prune_flows
from nftsg.agent.daemon import Agent, Backoff
from nftsg.agent.lab import Lab
from nftsg.agent.nft_backend import NftBackend, NftError
from nftsg.agent.probe import socket_in
from nftsg.agent.settings import Settings
from nftsg.agent.store import Store, StoreError
from nftsg.translators.compiler import compile_vpc
from nftsg.translators.evaluator import Flow
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import Network
from nftsg.translators.nft import Program
from nftsg.translators.validate import build_network
from probes import tcp_connect

pytestmark = pytest.mark.netns

VPCS = ("vpc-a", "vpc-b")


def topology(port: int) -> dict[str, Any]:
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
                "inner_access_policy": "Drop",
                "permissions": [
                    {
                        "direction": "ingress",
                        "ip_protocol": "TCP",
                        "port_range": f"{port}/{port}",
                        "source_cidr_ip": f"10.{n}.0.0/16",
                    }
                ],
            }
        )
        for role, host in (("c", 10), ("s", 20)):
            doc["instances"].append(
                {
                    "instance_id": f"i-{role}{n}",
                    "vswitch_id": f"vsw-{n}",
                    "private_ip_address": f"10.{n}.1.{host}",
                    "security_group_ids": [f"sg-{n}"],
                }
            )
    return doc


class Faults:
    def __init__(self) -> None:
        self.store = False
        self.compile: set[str] = set()
        self.apply: set[str] = set()
        self.judge = False


class FlakyNft(NftBackend):
    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        if namespace in self.faults.apply and commands:
            raise NftError(
                "nft transaction failed",
                rc=1,
                stderr="injected",
                batch=commands,
                namespace=namespace,
            )
        super().apply(namespace, commands)


class FlakyStore(Store):
    faults: Faults

    def revision(self) -> int:
        if self.faults.store:
            raise StoreError("injected: unable to open database file")
        return super().revision()


class Rig:
    def __init__(self, lab: Lab, state_dir: Path) -> None:
        self.lab = lab
        self.faults = Faults()
        self.now = 100.0
        self.writer = Store(state_dir / "state.db")
        store = FlakyStore(state_dir / "state.db")
        store.faults = self.faults

        def compile_program(network: Network, vpc_id: str, table: str, bit: int) -> Program:
            if vpc_id in self.faults.compile:
                raise RuntimeError(f"injected compiler bug for {vpc_id}")
            return compile_vpc(network, vpc_id, table, ct_mark_bit=bit)

        def judge(namespace: str, allowed: Callable[[Flow], bool], bit: int) -> int:
            if self.faults.judge:
                raise ConntrackError("injected: netlink socket closed", namespace=namespace)
            return prune_flows(namespace, allowed, bit)

        self.agent = Agent(
            Settings(state_dir=state_dir, prefix=lab.prefix, table="nftsg"),
            backend=FlakyNft(self.faults),
            store=store,
            judge_flows=judge,
            compile_program=compile_program,
            backoff=Backoff(first=1.0, cap=4.0),
            clock=lambda: self.now,
        )

    def save(self, port: int) -> Network:
        doc = topology(port)
        self.writer.save_topology(doc)
        return build_network(topology_from_data(doc))

    def rounds(self, n: int = 2) -> None:
        for _ in range(n):
            self.agent.step()
            self.now += 0.1

    def allows(self, n: int, port: int) -> bool:
        client = self.lab.host_ns(f"i-c{n}")
        server = self.lab.host_ns(f"i-s{n}")
        return tcp_connect(client, server, f"10.{n}.1.20", port, timeout=0.4)

    def enforces(self, n: int, port: int) -> None:
        other = 80 if port == 22 else 22
        assert self.allows(n, port), f"vpc {n}: TCP {port} should pass"
        assert not self.allows(n, other), f"vpc {n}: TCP {other} must stay closed"

    def close(self) -> None:
        self.agent.close()
        self.writer.close()


@pytest.fixture
def rig(lab: Lab, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(lab, tmp_path)
    try:
        network = r.save(22)
        lab.ensure_routers(network)
        r.rounds(1)
        lab.apply(network)
        r.enforces(1, 22)
        r.enforces(2, 22)
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("step", ["apply", "compile"])
def test_router_fault_keeps_last_good_rules_and_others_enforced(rig: Rig, step: str) -> None:
    faulty = rig.lab.router_ns("vpc-a")
    if step == "apply":
        rig.faults.apply.add(faulty)
    else:
        rig.faults.compile.add("vpc-a")
    rig.save(80)
    rig.rounds(3)
    rig.enforces(1, 22)  # last good rules: never opened, never emptied
    rig.enforces(2, 80)  # the healthy router moved on
    assert rig.agent.counters[f"failures.{step}"] >= 1
    rig.faults.apply.clear()
    rig.faults.compile.clear()
    rig.now += 5
    rig.rounds(1)
    rig.enforces(1, 80)
    rig.enforces(2, 80)
    assert rig.agent.routers[faulty].failures == 0


def test_store_fault_keeps_enforcing(rig: Rig) -> None:
    rig.faults.store = True
    rig.save(80)  # written by another process; the agent cannot read the store
    rig.rounds(3)
    rig.enforces(1, 22)
    rig.enforces(2, 22)
    assert rig.agent.counters["failures.store"] >= 3
    rig.faults.store = False
    rig.rounds(1)
    rig.enforces(1, 80)
    rig.enforces(2, 80)


def _open_flow(rig: Rig, n: int, port: int) -> tuple[socket.socket, socket.socket]:
    server_ns = rig.lab.host_ns(f"i-s{n}")
    client_ns = rig.lab.host_ns(f"i-c{n}")
    listener = socket_in(server_ns, socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((f"10.{n}.1.20", port))
    listener.listen(1)
    client = socket_in(client_ns, socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(2)
    client.connect((f"10.{n}.1.20", port))
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(0.5)
    return client, conn


def _passes(client: socket.socket, conn: socket.socket) -> bool:
    try:
        client.send(b"x")
        return conn.recv(1) == b"x"
    except OSError:  # timeout: the packet was dropped
        return False


def test_flow_judge_fault_never_undoes_the_commit_and_is_retried(rig: Rig) -> None:
    client, conn = _open_flow(rig, 1, 22)
    try:
        assert _passes(client, conn)
        rig.faults.judge = True
        rig.save(80)
        rig.rounds(2)
        # The new rules are in force for new flows in both routers.
        rig.enforces(1, 80)
        rig.enforces(2, 80)
        assert rig.agent.counters["failures.flows"] >= 1
        rig.faults.judge = False
        rig.now += 5
        rig.rounds(1)
        # Judged on the retry: the established flow to 22 is cut.
        deadline = time.monotonic() + 2
        while _passes(client, conn) and time.monotonic() < deadline:
            pass
        assert not _passes(client, conn), "the revoked flow still passes after the retry"
        assert not any(r.unjudged for r in rig.agent.routers.values())
    finally:
        client.close()
        conn.close()
