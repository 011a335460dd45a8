"""`nftsg agent` as systemd runs it, against the real kernel: sd_notify, metrics, reload.

The agent is started the way a `Type=notify` unit starts it: NOTIFY_SOCKET names
a datagram socket the test reads (what systemd would), WATCHDOG_USEC asks for
watchdog pings, the settings come from a file. The test checks:

- READY=1 comes only once the router's table is in the kernel and the store
  records the revision in force; WATCHDOG=1 keeps coming from the loop;
- the Prometheus metrics scraped over HTTP agree with what was done: one sync,
  the rule count of the kernel's table, and after `nft flush ruleset` in the
  router one drift repair and one more full sync;
- SIGHUP re-reads the settings file (RELOADING=1, then READY=1 after the full
  rewrite); a reload asking for a restart-only change is counted as a failed
  reload and changes nothing;
- SIGTERM sends STOPPING=1, exits 0 and leaves the rules in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from e2e import NFTSG, describe, ns_run, wait_for
from nftsg.agent.lab import Lab
from nftsg.agent.store import Store
from nftsg.translators.network import Network
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.netns

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def kernel_rule_count(namespace: str) -> int | None:
    proc = ns_run(namespace, ["nft", "-j", "list", "table", "inet", "nftsg"])
    if proc.returncode != 0:
        return None
    return sum(1 for item in json.loads(proc.stdout)["nftables"] if "rule" in item)


class Notifications:
    """The datagram socket systemd would listen on; messages in arrival order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.seen: list[str] = []

    def next(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.seen.append(message)
        return message

    def wait(self, field: str, timeout: float) -> list[str]:
        """Messages up to and including the first with `field` (e.g. READY=1)."""
        deadline = time.monotonic() + timeout
        got: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if message is None:
                break
            got.append(message)
            if field in message.splitlines():
                return got
        raise AssertionError(f"no {field} within {timeout} s; got {got}")

    def close(self) -> None:
        self.sock.close()


class AgentUnderTest:
    def __init__(self, tmp_path: Path, prefix: str, network: Network) -> None:
        self.prefix = prefix
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir()
        self.config = tmp_path / "agent.yaml"
        self.metrics_port = free_port()
        self.write_config(verify_interval=0.5)
        self.lab = Lab(prefix)
        self.lab.ensure_routers(network)
        self.router = self.lab.router_ns("vpc-demo")
        self.notify = Notifications(tmp_path / "notify.sock")
        self.log = tmp_path / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, **extra: object) -> None:
        doc = {
            "state_dir": str(self.state_dir),
            "prefix": self.prefix,
            "metrics_listen": f"127.0.0.1:{self.metrics_port}",
            **extra,
        }
        self.config.write_text(yaml.safe_dump(doc))

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NFTSG_")}
        env.update(NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC="400000")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(NFTSG), "agent", "--config", str(self.config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()
        self.lab.destroy()


@pytest.fixture
def agent(tmp_path: Path, lab_prefix: str, demo_network: Network) -> Iterator[AgentUnderTest]:
    rig = AgentUnderTest(tmp_path, lab_prefix, demo_network)
    try:
        yield rig
    finally:
        rig.close()


def save_demo(state_dir: Path, prefix: str) -> int:
    from conftest import EXAMPLES

    with contextlib.closing(Store(state_dir / "state.db")) as store:
        revision = store.save_topology(yaml.safe_load((EXAMPLES / "three-tier.yaml").read_text()))
        store.set_setting("prefix", prefix)
    return revision


def test_ready_watchdog_metrics_drift_reload_stop(agent: AgentUnderTest) -> None:
    revision = save_demo(agent.state_dir, agent.prefix)
    agent.start()

    # READY only once the rules are in force.
    before_ready = agent.notify.wait("READY=1", timeout=60)
    assert not any("READY=1" in m.splitlines() for m in before_ready[:-1])
    rules_at_ready = kernel_rule_count(agent.router)
    assert rules_at_ready, "READY=1 before the router's table was in the kernel"
    with contextlib.closing(Store(agent.state_dir / "state.db")) as store:
        record = store.applied(agent.router)
    assert record is not None and record.revision == revision
    assert "STATUS=revision 1: 1 routers, all in force" in before_ready[-1]

    # The loop feeds the watchdog (every 0.2 s for WatchdogSec=0.4 s).
    pings = [agent.notify.wait("WATCHDOG=1", timeout=5) for _ in range(3)]
    assert len(pings) == 3

    # Metrics against what was done.
    samples = scrape(agent.metrics_port)
    assert samples[("nftsg_ready", ())] == 1
    assert samples[("nftsg_revision", ())] == revision
    assert samples[("nftsg_syncs_total", ())] == 1
    assert samples[("nftsg_sync_duration_seconds_count", (("kind", "full"),))] == 1
    assert samples[("nftsg_rules_programmed", (("namespace", agent.router),))] == rules_at_ready
    assert samples[("nftsg_drift_repairs_total", ())] == 0
    assert samples[("nftsg_routers", (("state", "in_force"),))] == 1

    # Tamper: the next drift check (0.5 s) finds it, the next round rewrites the table.
    flushed = ns_run(agent.router, ["nft", "flush", "ruleset"])
    assert flushed.returncode == 0, describe(flushed)
    assert wait_for(lambda: scrape(agent.metrics_port)[("nftsg_syncs_total", ())] == 2, 10), (
        agent.log_text()
    )
    samples = scrape(agent.metrics_port)
    assert samples[("nftsg_drift_repairs_total", ())] == 1
    assert samples[("nftsg_sync_duration_seconds_count", (("kind", "full"),))] == 2
    assert kernel_rule_count(agent.router) == rules_at_ready

    # SIGHUP: settings read again, every router rewritten in full, READY again.
    agent.write_config(verify_interval=0.5, log_level="debug")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    reload_messages = agent.notify.wait("READY=1", timeout=30)
    assert any("RELOADING=1" in m.splitlines() for m in reload_messages)
    samples = scrape(agent.metrics_port)
    assert samples[("nftsg_syncs_total", ())] == 3
    assert samples[("nftsg_failures_total", (("step", "reload"),))] == 0
    assert "reload: settings read from" in agent.log_text()
    assert " DEBUG " in agent.log_text()  # the new log level is in force

    # A change that needs a restart: refused, counted, the agent goes on as it was.
    agent.write_config(verify_interval=0.5, table="othertable")
    agent.proc.send_signal(signal.SIGHUP)
    agent.notify.wait("READY=1", timeout=30)
    samples = scrape(agent.metrics_port)
    assert samples[("nftsg_failures_total", (("step", "reload"),))] == 1
    assert "InvalidSettings.NeedsRestart: table changed" in agent.log_text()
    assert kernel_rule_count(agent.router) == rules_at_ready

    # SIGTERM: STOPPING=1, exit 0, the rules stay.
    agent.proc.send_signal(signal.SIGTERM)
    agent.notify.wait("STOPPING=1", timeout=10)
    assert agent.proc.wait(10) == 0
    assert kernel_rule_count(agent.router) == rules_at_ready


def test_ready_with_nothing_stored_and_metrics_off(agent: AgentUnderTest) -> None:
    """A fresh host (empty state) is ready at once: there is nothing to enforce."""
    agent.write_config(metrics_listen="")
    agent.start()
    agent.notify.wait("READY=1", timeout=30)
    with pytest.raises(OSError):
        scrape(agent.metrics_port)
    assert "metrics on" not in agent.log_text()
