"""WATCHDOG=1 is fed by the main loop itself: a round that hangs stops the pings (so
systemd's WatchdogSec kills and restarts the agent), and they resume when the round
finishes. READY=1 is sent only after the round that put every router in force.

No root: fake backend whose commit can be held, real store, a recording notifier.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from nftsg.agent.daemon import Agent
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.settings import Settings
from nftsg.agent.store import Store

NS = "wd-r-vpc-a"

TOPOLOGY: dict[str, Any] = {
    "vpcs": [
        {
            "vpc_id": "vpc-a",
            "cidr_block": "10.1.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-1", "cidr_block": "10.1.1.0/24"}],
        }
    ],
    "security_groups": [{"security_group_id": "sg-1", "vpc_id": "vpc-a"}],
    "instances": [
        {
            "instance_id": "i-1",
            "vswitch_id": "vsw-1",
            "private_ip_address": "10.1.1.10",
            "security_group_ids": ["sg-1"],
        }
    ],
}


class HeldBackend(FakeBackend):
    """apply() waits until `release` is set: a commit that hangs in the kernel."""

    def __init__(self, namespaces: list[str]) -> None:
        super().__init__(namespaces)
        self.release = threading.Event()
        self.entered = threading.Event()

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        self.entered.set()
        self.release.wait(30)
        super().apply(namespace, commands)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, state: str) -> None:
        with self.lock:
            self.messages.append((time.monotonic(), state))

    def count(self, field: str, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for t, m in self.messages if t >= since and field in m.splitlines())


def test_watchdog_pings_stop_while_a_round_hangs(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as writer:
        writer.save_topology(TOPOLOGY)
    backend = HeldBackend([NS])
    notify = Recorder()
    agent = Agent(
        Settings(state_dir=tmp_path, prefix="wd", table="nftsg"),
        backend=backend,
        store=Store(tmp_path / "state.db"),
        namespace_exists=lambda _ns: True,
        judge_flows=None,
        list_flows=None,
        poll_interval=0.01,
        notify=notify,
        watchdog_every=0.05,
    )
    loop = threading.Thread(target=agent.run)
    loop.start()
    try:
        assert backend.entered.wait(10)
        hung_at = time.monotonic()
        time.sleep(0.5)  # ten watchdog periods with the round stuck in the commit
        assert notify.count("WATCHDOG=1", since=hung_at) == 0
        assert notify.count("READY=1") == 0  # nothing is in force yet

        backend.release.set()
        deadline = time.monotonic() + 10
        while notify.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert notify.count("READY=1") == 1
        assert notify.count("WATCHDOG=1") >= 3
        assert backend.list_table(NS, "inet", "nftsg") is not None
        ready_at = next(t for t, m in notify.messages if "READY=1" in m.splitlines())
        assert ready_at > hung_at
    finally:
        backend.release.set()
        agent.stop_event.set()
        loop.join(10)
        agent.close()
    assert notify.messages[-1][1] == "STOPPING=1"
