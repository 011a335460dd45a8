"""Per-rule hit counters and `nftsg report` against real traffic in a lab.

One lab (agent with `rule_counters` on, read every 0.3 s so readings come
quickly). Counted are the packets that reach the rule chains, i.e. the first
packet of each new flow: N TCP connections matching rule "web" add exactly N to
its total, N refused UDP datagrams matching drop rule "deny81" add N to it (the
drop region's second lookup), "ssh" stays unused. A rule change in the same
group that recreates web's elements keeps its total (the agent reads the
counters before the change and accumulates), and so does an agent restart.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import CliLab, cli_lab, describe, wait_for, write_yaml
from probes import tcp_connect, udp_probe

pytestmark = pytest.mark.netns

VPC = "vpc-h"
WEB, CLI = "10.2.1.10", "10.2.1.20"
TOPOLOGY: dict[str, Any] = {
    "vpcs": [
        {
            "vpc_id": VPC,
            "cidr_block": "10.2.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-h", "cidr_block": "10.2.1.0/24"}],
        }
    ],
    "security_groups": [
        {
            "security_group_id": "sg-web",
            "vpc_id": VPC,
            "permissions": [
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "80/80",
                    "source_cidr_ip": "10.2.1.0/24",
                    "priority": 5,
                    "description": "web",
                },
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "22/22",
                    "source_cidr_ip": "198.51.100.0/24",
                    "priority": 1,
                    "description": "ssh",
                },
                {
                    "direction": "ingress",
                    "ip_protocol": "UDP",
                    "port_range": "81/81",
                    "source_cidr_ip": "10.2.1.0/24",
                    "policy": "drop",
                    "priority": 1,
                    "description": "deny81",
                },
                {
                    "direction": "ingress",
                    "ip_protocol": "UDP",
                    "port_range": "1/65535",
                    "source_cidr_ip": "10.2.0.0/16",
                    "priority": 50,
                    "description": "udp",
                },
            ],
        },
        {"security_group_id": "sg-cli", "vpc_id": VPC},
    ],
    "instances": [
        {
            "instance_id": "i-web",
            "vswitch_id": "vsw-h",
            "private_ip_address": WEB,
            "security_group_ids": ["sg-web"],
        },
        {
            "instance_id": "i-cli",
            "vswitch_id": "vsw-h",
            "private_ip_address": CLI,
            "security_group_ids": ["sg-cli"],
        },
    ],
}


class CountingLab(CliLab):
    def env(self) -> dict[str, str]:
        env = super().env()
        env["NFTSG_RULE_COUNTERS"] = "true"
        env["NFTSG_RULE_COUNTERS_INTERVAL"] = "0.3"
        env["NFTSG_METRICS_LISTEN"] = ""
        return env


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> Iterator[CountingLab]:
    state = tmp_path_factory.mktemp("hits-lab")
    with cli_lab(f"{run_prefix}h", state) as plain:
        counting = CountingLab(plain.prefix, plain.state_dir)
        try:
            counting.up(write_yaml(state / "lab.yaml", TOPOLOGY))
            yield counting
        finally:
            plain.agent_pids |= counting.agent_pids


def report(lab: CliLab, *args: str) -> dict[str, Any]:
    proc = lab.run("report", *args, "--json")
    assert proc.returncode == 0, describe(proc)
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def by_description(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["Description"]: r for r in doc["Rules"] if r["Description"]}


def packets(lab: CliLab, name: str) -> int:
    return int(by_description(report(lab, "rule-hits"))[name]["Packets"])


def settle(lab: CliLab, name: str, want: int) -> int:
    """The rule's total once a reading shows `want` (or what it shows after 10 s), and
    one more reading later (a total that overshoots must show)."""
    wait_for(lambda: packets(lab, name) >= want, timeout=10, interval=0.2)
    last = report(lab, "rule-hits")["LastReading"]
    wait_for(lambda: report(lab, "rule-hits")["LastReading"] != last, timeout=5, interval=0.2)
    return packets(lab, name)


def connect_web(lab: CliLab, n: int) -> None:
    for _ in range(n):
        assert tcp_connect(lab.instance_ns("i-cli"), lab.instance_ns("i-web"), WEB, 80)


def test_counts_follow_the_traffic_and_unused_rules_are_listed(lab: CountingLab) -> None:
    web0, deny0 = packets(lab, "web"), packets(lab, "deny81")
    connect_web(lab, 5)
    assert settle(lab, "web", web0 + 5) == web0 + 5
    for _ in range(3):
        probe = udp_probe(lab.instance_ns("i-cli"), lab.instance_ns("i-web"), WEB, 81, timeout=0.3)
        assert not probe.ok
    assert settle(lab, "deny81", deny0 + 3) == deny0 + 3
    # An allowed UDP flow is counted on its own rule, not on the drop rule.
    assert udp_probe(lab.instance_ns("i-cli"), lab.instance_ns("i-web"), WEB, 82).ok
    assert settle(lab, "udp", 1) >= 1
    assert packets(lab, "deny81") == deny0 + 3

    unused = by_description(report(lab, "unused-rules"))
    assert "ssh" in unused and "web" not in unused and "deny81" not in unused
    # Unused since a time after the last hit: web is listed again.
    time.sleep(1.1)
    later = by_description(report(lab, "unused-rules", "--since", "1s"))
    assert "web" in later and "ssh" in later
    # The client's egress (basic group, no rules) falls to its counted default.
    defaults = report(lab, "rule-hits")["Defaults"]
    assert any(v["Packets"] >= 5 for k, v in defaults.items() if " out_" in k), defaults


def test_totals_survive_a_change_that_recreates_the_rule_elements(lab: CountingLab) -> None:
    connect_web(lab, 2)
    before = settle(lab, "web", 2)
    # A drop inside web's source range at a higher priority splits web's box.
    proc = lab.run(
        "ecs",
        "AuthorizeSecurityGroup",
        "--SecurityGroupId",
        "sg-web",
        "--Permissions.1.IpProtocol",
        "TCP",
        "--Permissions.1.PortRange",
        "80/80",
        "--Permissions.1.SourceCidrIp",
        "10.2.1.99/32",
        "--Permissions.1.Policy",
        "drop",
        "--Permissions.1.Priority",
        "1",
        "--Permissions.1.Description",
        "split",
    )
    assert proc.returncode == 0, describe(proc)
    assert packets(lab, "web") == before
    connect_web(lab, 3)
    assert settle(lab, "web", before + 3) == before + 3


def test_totals_survive_an_agent_restart(lab: CountingLab) -> None:
    connect_web(lab, 1)
    before = settle(lab, "web", 1)
    pid = lab.agent_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # the rules and the kernel's counters stay
    assert wait_for(lambda: lab.agent_pid() is None, timeout=10)
    lab.up(Path(lab.state_dir) / "lab.yaml")
    connect_web(lab, 2)
    assert settle(lab, "web", before + 2) == before + 2
