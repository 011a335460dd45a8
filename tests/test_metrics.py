"""The agent's Prometheus metrics, scraped over HTTP, agree with what the agent did.

No root: the agent runs on the fake backend with a real store; the metrics
server is the real one (prometheus-client) on a free loopback port. The same
scrape of a real agent process is in netns-tests/test_agent_ops.py.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nftsg.agent.daemon import Agent
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.metrics import MetricsServer
from nftsg.agent.nft_backend import NftError
from nftsg.agent.settings import Settings
from nftsg.agent.store import Store
from prometheus_client.parser import text_string_to_metric_families

NS = "mt-r-vpc-a"


def topology(port: int) -> dict[str, Any]:
    return {
        "vpcs": [
            {
                "vpc_id": "vpc-a",
                "cidr_block": "10.1.0.0/16",
                "vswitches": [{"vswitch_id": "vsw-1", "cidr_block": "10.1.1.0/24"}],
            }
        ],
        "security_groups": [
            {
                "security_group_id": "sg-1",
                "vpc_id": "vpc-a",
                "permissions": [
                    {
                        "direction": "ingress",
                        "ip_protocol": "TCP",
                        "port_range": f"{port}/{port}",
                        "source_cidr_ip": "0.0.0.0/0",
                    }
                ],
            }
        ],
        "instances": [
            {
                "instance_id": "i-1",
                "vswitch_id": "vsw-1",
                "private_ip_address": "10.1.1.10",
                "security_group_ids": ["sg-1"],
            }
        ],
    }


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class FailingBackend(FakeBackend):
    failing = False

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        if self.failing:
            raise NftError("injected", rc=1, stderr="injected", batch=commands, namespace=namespace)
        super().apply(namespace, commands)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.backend = FailingBackend([NS])
        self.writer = Store(tmp_path / "state.db")
        self.agent = Agent(
            Settings(state_dir=tmp_path, prefix="mt", table="nftsg"),
            backend=self.backend,
            store=Store(tmp_path / "state.db"),
            namespace_exists=lambda _ns: True,
            judge_flows=lambda _ns, _allowed, _bit: 2,
            list_flows=None,
        )
        self.metrics = MetricsServer(self.agent)
        self.address = self.metrics.start("127.0.0.1:0")

    def close(self) -> None:
        self.metrics.stop()
        self.agent.close()
        self.writer.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def test_metrics_follow_syncs_drift_and_failures(rig: Rig) -> None:
    before = scrape(rig.address)
    assert before[("nftsg_syncs_total", ())] == 0
    assert before[("nftsg_ready", ())] == 0
    assert before[("nftsg_failures_total", (("step", "apply"),))] == 0

    rig.writer.save_topology(topology(22))
    assert rig.agent.step()
    rig.agent.ready = True  # what run() does after an in-force round
    after = scrape(rig.address)
    assert after[("nftsg_syncs_total", ())] == 1
    assert after[("nftsg_sync_duration_seconds_count", (("kind", "full"),))] == 1
    assert after[("nftsg_revision", ())] == 1
    assert after[("nftsg_routers", (("state", "in_force"),))] == 1
    assert after[("nftsg_ready", ())] == 1
    program = rig.agent.reconciler.applied[NS]
    labels = (("namespace", NS),)
    assert after[("nftsg_rules_programmed", labels)] == sum(len(c.rules) for c in program.chains)
    assert after[("nftsg_sets_programmed", labels)] == len(program.sets) + len(program.maps)
    assert after[("nftsg_set_elements_programmed", labels)] == program.element_count()
    assert after[("nftsg_flows_marked_total", ())] == 2  # the judge marked two flows

    # A change goes out as a diff.
    rig.writer.save_topology(topology(80))
    assert rig.agent.step()
    changed = scrape(rig.address)
    assert changed[("nftsg_sync_duration_seconds_count", (("kind", "diff"),))] == 1
    assert changed[("nftsg_flows_marked_total", ())] == 4

    # Someone deletes the table: the next check finds it, the next round repairs it.
    rig.backend.delete_table(NS, "inet", "nftsg")
    assert rig.agent.verify() == [NS]
    assert rig.agent.step()
    repaired = scrape(rig.address)
    assert repaired[("nftsg_drift_repairs_total", ())] == 1
    assert repaired[("nftsg_syncs_total", ())] == 3
    assert repaired[("nftsg_sync_duration_seconds_count", (("kind", "full"),))] == 2

    # A failing commit is counted by its step and timed as "failed".
    rig.backend.failing = True
    rig.writer.save_topology(topology(443))
    assert not rig.agent.step()
    failed = scrape(rig.address)
    assert failed[("nftsg_failures_total", (("step", "apply"),))] == 1
    assert failed[("nftsg_sync_duration_seconds_count", (("kind", "failed"),))] == 1
    assert failed[("nftsg_routers", (("state", "failing"),))] == 1
