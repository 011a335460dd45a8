"""Someone changes a router's table behind the agent's back: it notices by content and
rewrites the table, and the firewall never stays open.

One VPC: a client and a server. The server's group lets TCP 22-24 in from the
VPC at priority 10 and drops TCP 23 at priority 1; the client's group drops its
own TCP 24 to the server on egress; so 22 is allowed and 23, 24 and 80 are
denied. The sets are found the way the kernel uses them (dispatch map -> chain
-> looked-up set with the wanted verdict), so the element tampers work on any
layout: an element added to a set that lets traffic in opens 80, an element
removed from a set that drops opens 24. Each test tampers with the real table through the `nft` tool
the way an intruder or a confused operator would (some tampers keep every
object and count as it was), checks the kernel really changed, then runs the
agent's rounds until the table is the program again, and measures how long
that took. Afterwards the allowed probe works and the denied ones are dropped.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nftsg.agent.daemon import Agent
from nftsg.agent.lab import Lab
from nftsg.agent.settings import Settings
from nftsg.agent.store import Store
from nftsg.translators.compiler import KEY_ORDER
from nftsg.translators.model import topology_from_data
from nftsg.translators.validate import build_network
from probes import tcp_connect

pytestmark = pytest.mark.netns

TABLE = "nftsg"
SERVER = "10.1.1.20"
TOPOLOGY: dict[str, Any] = {
    "vpcs": [
        {
            "vpc_id": "vpc-t",
            "cidr_block": "10.1.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-t", "cidr_block": "10.1.1.0/24"}],
        }
    ],
    "security_groups": [
        {
            "security_group_id": "sg-cli",
            "vpc_id": "vpc-t",
            "permissions": [
                {
                    "direction": "egress",
                    "ip_protocol": "TCP",
                    "port_range": "24/24",
                    "dest_cidr_ip": f"{SERVER}/32",
                    "priority": 1,
                    "policy": "drop",
                },
            ],
        },
        {
            "security_group_id": "sg-srv",
            "vpc_id": "vpc-t",
            "permissions": [
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "22/24",
                    "source_cidr_ip": "10.1.0.0/16",
                    "priority": 10,
                },
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "23/23",
                    "source_cidr_ip": "10.1.0.0/16",
                    "priority": 1,
                    "policy": "drop",
                },
            ],
        },
    ],
    "instances": [
        {
            "instance_id": "i-cli",
            "vswitch_id": "vsw-t",
            "private_ip_address": "10.1.1.10",
            "security_group_ids": ["sg-cli"],
        },
        {
            "instance_id": "i-srv",
            "vswitch_id": "vsw-t",
            "private_ip_address": SERVER,
            "security_group_ids": ["sg-srv"],
        },
    ],
}


class Router:
    def __init__(self, lab: Lab, state_dir: Path) -> None:
        self.lab = lab
        network = build_network(topology_from_data(TOPOLOGY))
        self.ifname = {
            name: network.enis[network.instances[name].eni_ids[0]].ifname
            for name in ("i-cli", "i-srv")
        }
        with Store(state_dir / "state.db") as store:
            store.save_topology(TOPOLOGY)
        lab.ensure_routers(network)
        self.agent = Agent(
            Settings(state_dir=state_dir, prefix=lab.prefix, table=TABLE),
            verify_every=0.2,
            selfcheck_every=3600,
        )
        assert self.agent.step()
        lab.apply(network)
        self.ns = lab.router_ns("vpc-t")
        self.client = lab.host_ns("i-cli")
        self.server = lab.host_ns("i-srv")

    def nft(self, *args: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, "nft", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, f"nft {' '.join(args)}: {done.stderr}"
        return done.stdout

    def rules(self, chain: str) -> list[dict[str, Any]]:
        listing = json.loads(self.nft("-a", "-j", "list", "chain", "inet", TABLE, chain))
        return [item["rule"] for item in listing["nftables"] if "rule" in item]

    def handle(self, chain: str, comment_part: str) -> int:
        for rule in self.rules(chain):
            if comment_part in rule.get("comment", ""):
                return int(rule["handle"])
        raise AssertionError(f"no rule with comment {comment_part!r} in {chain}")

    def chain(self, instance: str, direction: str) -> str:
        """The chain the kernel's dispatch map jumps to for the instance's port."""
        dispatch = f"{direction}_dispatch"
        listing = json.loads(self.nft("-j", "list", "map", "inet", TABLE, dispatch))
        (body,) = [item["map"] for item in listing["nftables"] if "map" in item]
        for port, verdict in body.get("elem", []):
            if port == self.ifname[instance]:
                return str(verdict["jump"]["target"])
        raise AssertionError(f"{instance} is not in {dispatch}")

    def lookup_set(self, instance: str, direction: str, policy: str) -> str:
        """The (first IPv4) set the instance's chain of that direction looks up with the
        verdict of `policy` (accept: `return`, on to the other side)."""
        chain = self.chain(instance, direction)
        wanted = "return" if policy == "accept" else "drop"
        for rule in self.rules(chain):
            verdicts = [k for e in rule["expr"] for k in e if k in ("return", "drop")]
            lookups = [
                e["match"]["right"][1:]
                for e in rule["expr"]
                if "match" in e and str(e["match"]["right"]).startswith("@")
            ]
            if verdicts == [wanted] and lookups and "ipv4" in rule.get("comment", ""):
                return str(lookups[0])
        raise AssertionError(f"no {policy} lookup in {chain}")

    def drifted(self) -> list[str]:
        program = self.agent.reconciler.applied[self.ns]
        return self.agent.reconciler.differences(self.ns, program)

    def repair(self, timeout: float = 60.0) -> float:
        """Agent rounds until the table is the program again; seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.agent.step()
            program = self.agent.reconciler.applied.get(self.ns)
            if program is not None and not self.agent.reconciler.differences(self.ns, program):
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"not repaired in {timeout} s: {self.drifted()[:5]}")

    def allows(self, port: int, attempts: int = 1) -> bool:
        # A first SYN through a fresh router can wait on neighbour resolution for
        # about a second on a loaded machine, so an allowed probe gets a generous
        # timeout (and, where it must succeed, a few attempts); a dropped one
        # simply times out.
        return any(
            tcp_connect(self.client, self.server, SERVER, port, timeout=1.5)
            for _ in range(attempts)
        )


@pytest.fixture
def router(lab: Lab, tmp_path: Path) -> Iterator[Router]:
    r = Router(lab, tmp_path)
    try:
        assert r.allows(22, attempts=3)
        assert not any(r.allows(port) for port in (23, 24, 80))
        yield r
    finally:
        r.agent.close()


def flip_policy(r: Router) -> None:
    r.nft("chain", "inet", TABLE, "forward", "{ policy accept ; }")


def anti_spoofing_accept(r: Router) -> None:
    handle = r.handle("forward", "anti-spoofing ipv4")
    r.nft("replace", "rule", "inet", TABLE, "forward", "handle", str(handle), "accept")


def default_accept(r: Router) -> None:
    chain = r.chain("i-srv", "ingress")
    handle = r.rules(chain)[-1]["handle"]
    r.nft("replace", "rule", "inet", TABLE, chain, "handle", str(handle), "accept")


def delete_rule(r: Router) -> None:
    handle = r.handle("forward", "receiver ingress")
    r.nft("delete", "rule", "inet", TABLE, "forward", "handle", str(handle))


def element_text(proto: str, peer: str, dport: str, sport: str, local: str) -> str:
    """A rule-set element as nft text: fields given in the model's order, written in
    the kernel key's order (the compiler's KEY_ORDER)."""
    return " . ".join([(proto, peer, dport, sport, local)[i] for i in KEY_ORDER])


def add_accept_element(r: Router) -> None:
    name = r.lookup_set("i-srv", "ingress", "accept")
    r.nft(
        "add", "element", "inet", TABLE, name,
        "{ " + element_text("tcp", "10.1.0.0/16", "80", "0-65535", "0.0.0.0/0") + " }",
    )


def remove_drop_element(r: Router) -> None:
    name = r.lookup_set("i-cli", "egress", "drop")
    r.nft(
        "delete", "element", "inet", TABLE, name,
        "{ " + element_text("tcp", SERVER, "24", "0-65535", "0.0.0.0/0") + " }",
    )


def add_counter(r: Router) -> None:
    # Same objects, same counts: only the content differs.
    handle = r.handle("forward", "conntrack")
    r.nft("replace", "rule", "inet", TABLE, "forward", "handle", str(handle), "counter", "accept")


def delete_table(r: Router) -> None:
    r.nft("delete", "table", "inet", TABLE)


def flush_ruleset(r: Router) -> None:
    r.nft("flush", "ruleset")


TAMPERS: dict[str, Callable[[Router], None]] = {
    "forward policy accept": flip_policy,
    "anti-spoofing replaced by accept": anti_spoofing_accept,
    "ingress default flipped to accept": default_accept,
    "dispatch rule deleted": delete_rule,
    "element added to an accept set": add_accept_element,
    "element removed from a drop set": remove_drop_element,
    "counter added, counts kept": add_counter,
    "table deleted": delete_table,
    "flush ruleset": flush_ruleset,
}

# Tampers after which a denied probe really passes (the firewall is open until repaired).
OPENING = {
    "anti-spoofing replaced by accept": 80,
    "ingress default flipped to accept": 80,
    "dispatch rule deleted": 80,
    "element added to an accept set": 80,
    "element removed from a drop set": 24,
    "table deleted": 80,
    "flush ruleset": 80,
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tamper_is_detected_and_repaired(
    router: Router, tamper: str, record_property: Callable[[str, object], None]
) -> None:
    TAMPERS[tamper](router)
    assert router.drifted(), "the tamper left the table equal to the program"
    if tamper in OPENING:
        assert router.allows(OPENING[tamper], attempts=3), "the tamper did not open what it should"
    seconds = router.repair()
    record_property("repair_seconds", round(seconds, 3))
    print(f"{tamper}: repaired in {seconds:.3f} s")
    assert router.agent.counters["drift_repairs"] == 1
    assert router.allows(22, attempts=3)
    assert not any(router.allows(port) for port in (23, 24, 80))
    # Repaired once; the next rounds change nothing.
    sent = router.agent.counters["syncs"]
    for _ in range(5):
        router.agent.step()
        time.sleep(0.05)
    assert router.agent.counters["syncs"] == sent
    assert router.agent.counters["drift_repairs"] == 1
