"""Denied-flow logs (NFLOG) against real traffic in a lab.

The agent logs the drops of group sg-web (setting `log_denied_groups`), writes the
records as JSON lines too, kernel rate 5/s per dropping rule. A UDP probe dropped
by web's ingress drop rule "deny81" and a TCP probe dropped by web's ingress
default each give a record naming web's ENI, ingress, the flow and the rule (or
the default); an allowed probe gives none; a probe dropped by sg-cli (not logged)
gives none; a burst over the kernel's rate is logged at most at that rate while
every packet of it is still dropped.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import CliLab, cli_lab, wait_for, write_yaml
from nftsg.translators.naming import default_primary_eni_id
from probes import ns_exec, tcp_connect, tcp_probe, udp_probe

pytestmark = pytest.mark.netns

VPC = "vpc-d"
WEB, CLI = "10.3.1.10", "10.3.1.20"
RATE = 5
# Binds UDP 81, says so, counts datagrams until 2 s pass without one, prints the count.
COUNTER = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 81))\n"
    "print('bound', flush=True)\n"
    "s.settimeout(2.0)\n"
    "n = 0\n"
    "try:\n"
    "    while True:\n"
    "        s.recv(16)\n"
    "        n += 1\n"
    "except OSError:\n"
    "    pass\n"
    "print(n)\n"
)
TOPOLOGY: dict[str, Any] = {
    "vpcs": [
        {
            "vpc_id": VPC,
            "cidr_block": "10.3.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-d", "cidr_block": "10.3.1.0/24"}],
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
                    "source_cidr_ip": "10.3.1.0/24",
                    "priority": 5,
                    "description": "web",
                },
                {
                    "direction": "ingress",
                    "ip_protocol": "UDP",
                    "port_range": "81/81",
                    "source_cidr_ip": "10.3.1.0/24",
                    "policy": "drop",
                    "priority": 1,
                    "description": "deny81",
                },
            ],
        },
        {"security_group_id": "sg-cli", "vpc_id": VPC},
    ],
    "instances": [
        {
            "instance_id": "i-web",
            "vswitch_id": "vsw-d",
            "private_ip_address": WEB,
            "security_group_ids": ["sg-web"],
        },
        {
            "instance_id": "i-cli",
            "vswitch_id": "vsw-d",
            "private_ip_address": CLI,
            "security_group_ids": ["sg-cli"],
        },
    ],
}


class LoggingLab(CliLab):
    def env(self) -> dict[str, str]:
        env = super().env()
        env["NFTSG_LOG_DENIED_GROUPS"] = "sg-web"
        env["NFTSG_LOG_DENIED_FILE"] = "true"
        env["NFTSG_LOG_DENIED_RATE"] = str(RATE)
        env["NFTSG_LOG_DENIED_RECORDS_RATE"] = "10000"  # the kernel's rate is under test
        env["NFTSG_METRICS_LISTEN"] = ""
        return env


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> Iterator[LoggingLab]:
    state = tmp_path_factory.mktemp("denied-lab")
    with cli_lab(f"{run_prefix}d", state) as plain:
        logging_lab = LoggingLab(plain.prefix, plain.state_dir)
        try:
            logging_lab.up(write_yaml(state / "lab.yaml", TOPOLOGY))
            yield logging_lab
        finally:
            plain.agent_pids |= logging_lab.agent_pids


def records(lab: CliLab) -> list[dict[str, Any]]:
    path = Path(lab.state_dir) / "denied-flows.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def new_records(lab: CliLab, before: int, want: int) -> list[dict[str, Any]]:
    """The records after the first `before`, once at least `want` arrived (or 5 s
    passed), and after a short settle so that extra ones would show."""
    wait_for(lambda: len(records(lab)) >= before + want, timeout=5, interval=0.05)
    time.sleep(0.5)
    return records(lab)[before:]


def settle(lab: CliLab) -> int:
    """The number of records once no new one arrives for 1.2 s (past the limit's refill)."""
    n = -1
    while n != len(records(lab)):
        n = len(records(lab))
        time.sleep(1.2)
    return n


def test_drop_by_rule_and_by_default_are_logged_allowed_is_not(lab: LoggingLab) -> None:
    web_ns, cli_ns = lab.instance_ns("i-web"), lab.instance_ns("i-cli")
    eni = default_primary_eni_id("i-web")
    # Wait until the reader is bound (the agent binds it after the first sync):
    # a dropped probe repeated until one record arrives.
    assert wait_for(
        lambda: not udp_probe(cli_ns, web_ns, WEB, 81, timeout=0.2).ok and bool(records(lab)),
        timeout=15,
        interval=0.1,
    ), "no denied-flow record at all"
    before = settle(lab)

    assert tcp_connect(cli_ns, web_ns, WEB, 80)  # allowed: no record
    assert not udp_probe(cli_ns, web_ns, WEB, 81, sport=40081, timeout=0.3).ok
    got = new_records(lab, before, 1)
    assert len(got) == 1, got
    (rec,) = got
    assert rec["eni_id"] == eni and rec["direction"] == "ingress", rec
    assert (rec["protocol"], rec["src"], rec["dst"], rec["sport"], rec["dport"]) == (
        "udp",
        CLI,
        WEB,
        40081,
        81,
    ), rec
    assert rec["decided_by"] == "rule", rec
    assert (rec["security_group_id"], rec["rule_description"]) == ("sg-web", "deny81"), rec

    before = settle(lab)
    assert not tcp_probe(cli_ns, web_ns, WEB, 9999, sport=40999, timeout=0.3).ok
    got = new_records(lab, before, 1)
    assert got, "the default drop gave no record"
    # TCP retries the SYN: one record per refused packet, each the same.
    for rec in got:
        assert rec["eni_id"] == eni and rec["direction"] == "ingress", rec
        assert (rec["protocol"], rec["src"], rec["dst"], rec["dport"]) == (
            "tcp",
            CLI,
            WEB,
            9999,
        ), rec
        assert rec["decided_by"] == "default", rec


def test_a_group_without_logging_gives_no_record(lab: LoggingLab) -> None:
    web_ns, cli_ns = lab.instance_ns("i-web"), lab.instance_ns("i-cli")
    before = settle(lab)
    # Dropped by i-cli's ingress default (sg-cli, not logged).
    assert not udp_probe(web_ns, cli_ns, CLI, 5000, timeout=0.3).ok
    assert not udp_probe(web_ns, cli_ns, CLI, 5001, timeout=0.3).ok
    # A positive control in the same window: a logged drop does arrive.
    assert not udp_probe(cli_ns, web_ns, WEB, 81, timeout=0.3).ok
    got = new_records(lab, before, 1)
    assert [r["dst"] for r in got] == [WEB], got


def test_the_kernel_rate_limit_holds_and_every_packet_is_still_dropped(lab: LoggingLab) -> None:
    web_ns, cli_ns = lab.instance_ns("i-web"), lab.instance_ns("i-cli")
    before = settle(lab)
    n = 300
    sender = (
        "import socket,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "t=time.monotonic()\n"
        f"for i in range({n}): s.sendto(b'x',('{WEB}',81))\n"
        "print(time.monotonic()-t)\n"
    )
    # A listener in web counts what gets through: nothing may (the drop is not limited).
    listener = subprocess.Popen(
        ["ip", "netns", "exec", web_ns, "python3", "-c", COUNTER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "bound"
        started = time.monotonic()
        out = ns_exec(cli_ns, ["python3", "-c", sender])
        assert out.returncode == 0, out.stderr
        elapsed = time.monotonic() - started
        received, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert received.strip() == "0", received
    after = settle(lab)
    logged = after - before
    # The kernel's limit: a burst of 5, then RATE per second of the time spent sending.
    assert 1 <= logged <= 5 + RATE * (elapsed + 1), (logged, elapsed)
    assert logged < n
    # And the rule still drops right after the burst.
    assert not udp_probe(cli_ns, web_ns, WEB, 81, timeout=0.3).ok
