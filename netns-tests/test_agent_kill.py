"""The agent killed in the middle of a sync, and stopped with SIGTERM, under live traffic.

A lab is brought up with `nftsg lab up`; background traffic runs all along:

- denied: a new UDP flow every 20 ms from i-c to i-b:7000, denied by both
  models (by priority in one, by drop-wins-ties in the other). Not one
  datagram may ever arrive.
- allowed: one long-lived UDP flow i-a -> i-b:8000 (echoed back) plus a new
  UDP flow to the same port every 20 ms; allowed by both models, by different
  rules. Losses are counted and reported; the long-lived flow must lose none.
- toggled: a long-lived flow i-a -> i-b:9000, allowed by model A, denied by
  model B: after convergence it must be cut (B) or work again (A).

First two plain changes (A -> B -> A, the control), then several times with
different delays: `nftsg lab up` of the other model runs in a thread, and as
soon as the new revision is in the store the agent is SIGKILLed after the
delay, wherever it is in its sync. `nftsg lab up` of the same model again
restarts it; the lab must converge and `nftsg lab check` must agree with the
new model. Finally SIGTERM: the agent stops and the rules stay.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e import (
    CliLab,
    agent_alive,
    cli_lab,
    describe,
    expected_check_count,
    wait_for,
    write_yaml,
)
from nftsg.agent import netns
from probes import udp_request

VPC = "vpc-k"
A, B, C = "10.8.1.10", "10.8.1.20", "10.8.1.30"
DENIED_PORT, ALLOWED_PORT, TOGGLED_PORT = 7000, 8000, 9000
# Seconds after the new revision is stored; None: no kill (the control: a plain change).
KILL_DELAYS = (None, None, 0.0, 0.03, 0.08, 0.15, 0.3, 0.6)
INTERVAL = 0.02
CHECK_UDP = [str(p + 1) for p in (DENIED_PORT, ALLOWED_PORT, TOGGLED_PORT)]


def udp(port: int | str, peer: str, prio: int, policy: str = "accept") -> dict[str, Any]:
    ports = f"{port}/{port}" if isinstance(port, int) else port
    peer_key = "source_group_id" if peer.startswith("sg-") else "source_cidr_ip"
    return {
        "direction": "ingress",
        "ip_protocol": "UDP",
        "port_range": ports,
        peer_key: peer,
        "priority": prio,
        "policy": policy,
    }


def model(variant: str) -> dict[str, Any]:
    """Model A or B; they differ in how (and whether) i-b's ingress allows each flow."""
    if variant == "A":
        rules = [
            udp(f"{ALLOWED_PORT}/{ALLOWED_PORT + 1}", f"{A}/32", 10),
            udp(f"{TOGGLED_PORT}/{TOGGLED_PORT + 1}", f"{A}/32", 10),
            udp(DENIED_PORT, f"{C}/32", 1, "drop"),  # priority 1 beats the accept below
            udp("6990/7010", "10.8.1.0/24", 5),
        ]
    else:
        rules = [
            udp(f"{ALLOWED_PORT}/{ALLOWED_PORT + 1}", "sg-a", 20),  # now by group reference ...
            udp("7990/8010", "10.8.1.0/24", 50, "drop"),  # ... which outranks this drop
            udp(f"{TOGGLED_PORT}/{TOGGLED_PORT + 1}", f"{A}/32", 1, "drop"),
            udp(f"{DENIED_PORT}/{DENIED_PORT + 1}", f"{C}/32", 2),  # drop wins the tie at 2
            udp(DENIED_PORT, "10.8.1.0/24", 2, "drop"),
        ]
        # Bulk, so that the sync has something to chew on: 160 TCP rules in 40 buckets.
        rules += [
            {
                "direction": "ingress",
                "ip_protocol": "TCP",
                "port_range": f"{10000 + k}/{10000 + k}",
                "source_cidr_ip": f"10.8.{2 + k % 50}.{k % 250}/32",
                "priority": 1 + k % 40,
                "policy": "accept" if k % 3 else "drop",
            }
            for k in range(160)
        ]
    rules.append(
        {
            "direction": "ingress",
            "ip_protocol": "TCP",
            "port_range": "22/22",
            "source_cidr_ip": "0.0.0.0/0",
            "priority": 100,
        }
    )
    groups = [
        {"security_group_id": "sg-a", "vpc_id": VPC, "inner_access_policy": "Drop"},
        {
            "security_group_id": "sg-b",
            "vpc_id": VPC,
            "inner_access_policy": "Drop",
            "permissions": rules,
        },
        {"security_group_id": "sg-c", "vpc_id": VPC, "inner_access_policy": "Drop"},
    ]
    return {
        "vpcs": [
            {
                "vpc_id": VPC,
                "cidr_block": "10.8.0.0/16",
                "vswitches": [{"vswitch_id": "vsw-k", "cidr_block": "10.8.1.0/24"}],
            }
        ],
        "security_groups": groups,
        "instances": [
            {
                "instance_id": f"i-{n}",
                "vswitch_id": "vsw-k",
                "private_ip_address": ip,
                "security_group_ids": [f"sg-{n}"],
            }
            for n, ip in (("a", A), ("b", B), ("c", C))
        ],
    }


# -- background traffic ------------------------------------------------------------------


@dataclass
class Flowlog:
    sent: dict[int, float] = field(default_factory=dict)  # seq -> time sent
    echoed: dict[int, float] = field(default_factory=dict)  # seq -> time the echo came back

    def lost(self, until: float) -> list[int]:
        return sorted(s for s, t in self.sent.items() if t < until and s not in self.echoed)


class Traffic:
    """Senders in i-a and i-c, echo servers in i-b; one thread sends, one serves."""

    def __init__(self, lab: CliLab) -> None:
        self.ns = {n: lab.instance_ns(f"i-{n}") for n in "abc"}
        self.stop = threading.Event()
        self.leaks: list[tuple[float, bytes]] = []  # denied datagrams that arrived
        self.allowed_long = Flowlog()
        self.allowed_new = Flowlog()
        self.toggled = Flowlog()
        self.servers = {
            port: self._sock("b", B, port) for port in (DENIED_PORT, ALLOWED_PORT, TOGGLED_PORT)
        }
        self.long_client = self._sock("a", A, 40000)
        self.toggle_client = self._sock("a", A, 40001)
        self.new_clients: list[tuple[socket.socket, int]] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._serve, daemon=True),
        ]

    def _sock(self, n: str, addr: str, port: int) -> socket.socket:
        with netns.entered(self.ns[n]):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((addr, port))
        return sock

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for sock in [*self.servers.values(), self.long_client, self.toggle_client]:
            sock.close()
        for sock, _ in self.new_clients:
            sock.close()

    def _send(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            now = time.monotonic()
            payload = seq.to_bytes(4, "big")
            with self._lock:
                self.allowed_long.sent[seq] = now
                self.toggled.sent[seq] = now
                self.allowed_new.sent[seq] = now
            self.long_client.sendto(payload, (B, ALLOWED_PORT))
            self.toggle_client.sendto(payload, (B, TOGGLED_PORT))
            with netns.entered(self.ns["a"]):
                fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            fresh.sendto(payload, (B, ALLOWED_PORT))
            with netns.entered(self.ns["c"]):
                denied = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            denied.sendto(payload, (B, DENIED_PORT))  # a new ephemeral port: a new flow
            denied.close()
            with self._lock:
                self.new_clients.append((fresh, seq))
                while len(self.new_clients) > 100:  # keep ~2 s of sockets for late echoes
                    self.new_clients.pop(0)[0].close()
            self.stop.wait(INTERVAL)

    def _serve(self) -> None:
        while not self.stop.is_set():
            with self._lock:
                clients = {sock: seq for sock, seq in self.new_clients}
            socks = [*self.servers.values(), self.long_client, self.toggle_client, *clients]
            try:
                ready, _, _ = select.select(socks, [], [], 0.05)
            except (OSError, ValueError):
                continue  # a client socket closed under us
            now = time.monotonic()
            for sock in ready:
                try:
                    data, peer = sock.recvfrom(64)
                except OSError:
                    continue
                if sock is self.servers[DENIED_PORT]:
                    self.leaks.append((now, data))
                elif sock in self.servers.values():
                    sock.sendto(data, peer)
                else:
                    seq = int.from_bytes(data[:4], "big")
                    log = (
                        self.allowed_long
                        if sock is self.long_client
                        else self.toggled
                        if sock is self.toggle_client
                        else self.allowed_new
                    )
                    with self._lock:
                        log.echoed.setdefault(seq, now)

    def toggled_works(self, since: float, wait: float = 0.3) -> bool:
        """Did the long-lived toggled flow get an echo for a datagram sent after `since`?"""
        time.sleep(wait)
        with self._lock:
            return any(self.toggled.sent.get(s, 0) > since for s in self.toggled.echoed)


# -- the store ------------------------------------------------------------------------------


def revisions(lab: CliLab) -> tuple[int, int]:
    """(stored revision, revision applied in the VPC router), read as any tool would."""
    db = sqlite3.connect(lab.state_dir / "state.db", timeout=10)
    try:
        stored = db.execute("SELECT revision FROM topology").fetchone()
        applied = db.execute(
            "SELECT revision FROM applied WHERE namespace = ?", (lab.router_ns(VPC),)
        ).fetchone()
    finally:
        db.close()
    return (stored[0] if stored else 0), (applied[0] if applied else 0)


@pytest.fixture
def lab(tmp_path: Path, lab_prefix: str) -> Iterator[CliLab]:
    with cli_lab(lab_prefix, tmp_path / "state") as cli:
        yield cli
    assert not cli.namespaces()


def test_agent_killed_mid_sync_converges_and_never_opens(lab: CliLab, tmp_path: Path) -> None:
    files = {v: write_yaml(tmp_path / f"{v}.yaml", model(v)) for v in "AB"}
    lab.up(files["A"])
    report: list[str] = []
    with Traffic(lab) as traffic:
        time.sleep(0.3)
        current = "A"
        problems: list[str] = []
        for delay in KILL_DELAYS:
            target = "B" if current == "A" else "A"
            stored_before, _ = revisions(lab)
            pid = lab.agent_pid()
            assert pid is not None, lab.log_tail()
            result: dict[str, Any] = {}
            at_kill = (0, 0)
            writer = threading.Thread(
                target=lambda t=target, r=result: r.update(proc=lab.run("lab", "up", str(files[t])))
            )
            writer.start()
            assert wait_for(lambda b=stored_before: revisions(lab)[0] > b, 30, 0.002)
            saved = time.monotonic()
            sync_ms = -1.0
            if delay is None:  # the control: how long a sync takes after the save
                if wait_for(lambda: revisions(lab)[1] >= revisions(lab)[0], 30, 0.002):
                    sync_ms = (time.monotonic() - saved) * 1000
            else:
                time.sleep(delay)
                at_kill = revisions(lab)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            writer.join(120)
            first = result["proc"]
            restart_started = time.monotonic()
            if delay is not None:
                lab.up(files[target])  # restarts the agent, which resyncs in full
                new_pid = lab.agent_pid()
                assert new_pid is not None and new_pid != pid and not agent_alive(pid)
            else:
                assert first.returncode == 0, describe(first)
            restarted = time.monotonic() - restart_started
            assert revisions(lab)[1] == revisions(lab)[0]

            # The background flows hold their ports in i-b: check the neighbouring ones.
            check, summary = lab.check("--tcp", "22", "10005", "10006", "--udp", *CHECK_UDP)
            if check.returncode != 0 or summary.agree != summary.total:
                problems.append(
                    f"delay {delay}: lab check disagrees:\n"
                    + ("\n".join(summary.mismatches) or describe(check))
                )
            assert summary.total == expected_check_count(model(target), 3, 3)
            converged = time.monotonic()
            # The long-lived toggled flow: cut under B, working again under A.
            toggled = traffic.toggled_works(converged)
            if toggled != (target == "A"):
                problems.append(
                    f"delay {delay}: the established i-a -> i-b:{TOGGLED_PORT} flow "
                    f"{'still passes' if toggled else 'does not pass'} under model {target}\n"
                    + lab.log_tail(6)
                )
            report.append(
                f"-> {target}: no kill, applied {sync_ms:.0f} ms after the save, lab up exit "
                f"{first.returncode}, toggled flow passes: {toggled}"
                if delay is None
                else f"-> {target}: SIGKILL {delay * 1000:3.0f} ms after the save, stored/applied "
                f"{at_kill[0]}/{at_kill[1]} ({'after' if at_kill[1] >= at_kill[0] else 'before'} "
                f"the sync finished), first lab up exit {first.returncode}, "
                f"restart+converge {restarted:.2f} s, toggled flow passes: {toggled}"
            )
            current = target
        until = time.monotonic() - 1.0  # echoes of the last second may be in flight
        long_lost = traffic.allowed_long.lost(until)
        new_lost = traffic.allowed_new.lost(until)
        sent = len([t for t in traffic.allowed_long.sent.values() if t < until])
        leaks = list(traffic.leaks)
    print("\n".join(report))
    print(f"allowed long-lived flow: {len(long_lost)} of {sent} lost {long_lost[:20]}")
    print(f"allowed new flows:       {len(new_lost)} of {sent} lost {new_lost[:20]}")
    print(f"denied flow:             {len(leaks)} of {sent} got through")
    assert sent > 100
    assert not leaks, f"the denied flow got through: {leaks}"
    assert not problems, "\n".join(problems)
    assert not long_lost, f"the allowed long-lived flow lost datagrams {long_lost}"


def test_sigterm_stops_the_agent_and_leaves_the_rules(lab: CliLab, tmp_path: Path) -> None:
    lab.up(write_yaml(tmp_path / "A.yaml", model("A")))
    ns = {n: lab.instance_ns(f"i-{n}") for n in "abc"}
    table = lab.table(VPC)
    pid = lab.agent_pid()
    assert table is not None and pid is not None
    with Traffic(lab) as traffic:
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not agent_alive(pid), 10), "agent ignored SIGTERM"
        stopped = time.monotonic()
        time.sleep(0.5)
        assert traffic.toggled_works(stopped, 0)  # allowed under A: still flowing
        leaks = list(traffic.leaks)
        until = time.monotonic() - 0.3
        long_lost = traffic.allowed_long.lost(until)
    assert lab.agent_pid() is None
    assert lab.table(VPC) == table  # same objects, same handles
    assert not leaks
    assert not long_lost
    assert udp_request(ns["a"], ns["b"], B, ALLOWED_PORT, timeout=0.5)
    assert not udp_request(ns["c"], ns["b"], B, DENIED_PORT, timeout=0.3)
    assert not udp_request(ns["c"], ns["b"], B, TOGGLED_PORT, timeout=0.3)
