"""The Docker lab end to end, and the agent under a real systemd.

One module (not a conftest.py: netns-tests/ imports its own conftest by name):
dockerd is started if none answers (and stopped again at the end); the
debootstrapped base image is kept as the cache between runs; this run's nftsg
image, containers and dockerd's namespaces of them are removed, also on failure.

The lab: the agent in a privileged container, every host of
examples/three-tier.yaml in its own `--network none` container, real traffic
between the containers checked against the reference evaluator.

systemd: a privileged container of the same image boots /sbin/init (systemd
252); the unit (deploy/systemd/nftsg-agent.service) and the settings file
(deploy/agent.yaml) are installed where deploy/install-host.sh puts them. One
test drop-in shortens `WatchdogSec` to 3 s (the hung-agent test would otherwise
wait a minute), and adds `Type=notify`/`ExecReload` only if the unit lacks
them; the test output says what it added.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_dockerlab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dockerlab", REPO / "deploy/docker/dockerlab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dockerlab"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dockerlab() -> ModuleType:
    if os.geteuid() != 0:
        pytest.skip("the Docker lab needs root")
    return _load_dockerlab()


def docker_netns() -> set[str]:
    try:
        return set(os.listdir("/var/run/docker/netns"))
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session")
def docker_env(dockerlab: ModuleType) -> Iterator[dict[str, Any]]:
    """(client, image tag, timings); removes the image (and stops a dockerd it started)."""
    client, started = dockerlab.docker_client()
    netns_before = docker_netns()
    tag = f"nftsg-lab:t{secrets.token_hex(4)}"
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        dockerlab.ensure_images(client, tag)
        timings["images"] = time.monotonic() - t0
        print(f"\nimages built in {timings['images']:.1f} s")
        yield {"client": client, "image": tag, "timings": timings}
    finally:
        leftover = [
            c.name
            for c in client.containers.list(all=True)
            if c.name.startswith("t") and c.labels.get(dockerlab.LABEL, "").startswith("t")
        ]
        for name in leftover:
            client.containers.get(name).remove(force=True)
        dockerlab.remove_image(client, tag)
        # dockerd removes a gone container's namespace file lazily (libnetwork
        # collects them about a minute later): wait for that, then check.
        deadline = time.monotonic() + 120
        while not docker_netns() <= netns_before and time.monotonic() < deadline:
            time.sleep(1)
        left = docker_netns() - netns_before
        client.close()
        if started:
            dockerlab.stop_dockerd()
        assert not leftover, f"containers left behind: {leftover}"
        assert not left, f"dockerd left container namespaces: {sorted(left)}"


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"


def _host_netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def test_container_lab_traffic_agrees_with_evaluator(
    dockerlab: ModuleType, docker_env: dict[str, Any], prefix: str
) -> None:
    client = docker_env["client"]
    netns_before = _host_netns()
    lab = dockerlab.DockerLab(client, prefix, docker_env["image"])
    try:
        t0 = time.monotonic()
        out = lab.up(REPO / "examples/three-tier.yaml")
        up_s = time.monotonic() - t0
        assert f"lab {prefix!r} is up" in out
        containers = {c.name for c in lab.containers()}
        assert f"{prefix}-agent" in containers and f"{prefix}-i-web1" in containers
        assert len(containers) == 8  # 5 instances, 2 external hosts, the agent

        t0 = time.monotonic()
        outcomes = lab.check()
        check_s = time.monotonic() - t0
        print(f"\nlab up {up_s:.1f} s, check {check_s:.1f} s")
        print(dockerlab.render(outcomes))
        wrong = [o for o in outcomes if o["observed"] != o["expected"]]
        assert not wrong, dockerlab.render(wrong, verbose=True)
        assert len(outcomes) > 300
        allowed = {o["label"] for o in outcomes if o["observed"]}
        dropped = {o["label"] for o in outcomes if not o["observed"]}
        # Both verdicts really happen between containers, e.g.:
        assert "i-web1 -> i-app1 tcp/8080 (10.0.2.10)" in allowed
        assert "i-db1 -> i-app1 tcp/8080 (10.0.2.10)" in dropped
        assert "office -> i-bastion tcp/22 (10.0.9.10)" in allowed
        assert "internet -> i-bastion tcp/22 (10.0.9.10)" in dropped
        # The router namespaces live in the agent container, not on the host.
        assert not {n for n in _host_netns() if n.startswith(f"{prefix}-")}
    finally:
        lab.down()
    assert lab.containers() == []
    assert not {n for n in _host_netns() - netns_before if n.startswith(f"{prefix}-")}
    assert not Path(f"/run/netns/{prefix}-r-vpc-demo").exists()


UNIT = "nftsg-agent.service"
ROUTER = "nftsg-r-vpc-demo"  # the shipped unit runs the agent with the default prefix
DROPIN = "/etc/systemd/system/nftsg-agent.service.d/50-test.conf"


class Booted:
    def __init__(self, container: Any) -> None:
        self.c = container
        self.dropin: list[str] = []

    def sh(self, script: str, check: bool = True) -> str:
        code, out = self.c.exec_run(["bash", "-c", script])
        text = out.decode(errors="replace")
        if check and code != 0:
            raise AssertionError(f"`{script}` exited {code}:\n{text}")
        return text

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def applied(self) -> int:
        """The revision the agent recorded in force in the router (0: none)."""
        out = self.sh(
            "python -c 'from nftsg.agent.store import Store; "
            f'r = Store("/var/lib/nftsg/state.db").applied("{ROUTER}"); '
            "print(r.revision if r else 0)'"
        )
        return int(out.strip().splitlines()[-1])

    def table_present(self) -> bool:
        code, _ = self.c.exec_run(
            ["ip", "netns", "exec", ROUTER, "nft", "list", "table", "inet", "nftsg"]
        )
        return code == 0


@pytest.fixture(scope="module")
def booted(dockerlab: ModuleType, docker_env: dict[str, Any]) -> Iterator[Booted]:
    client = docker_env["client"]
    prefix = f"t{secrets.token_hex(4)}"
    container = dockerlab.run_container(
        client,
        docker_env["image"],
        ["/sbin/init"],
        name=f"{prefix}-systemd",
        hostname="nftsg-systemd",
        labels={dockerlab.LABEL: prefix},
        privileged=True,
        init=False,  # systemd is PID 1
        binds=["/sys/fs/cgroup:/sys/fs/cgroup:rw"],
        tmpfs={"/run": "", "/run/lock": "", "/tmp": ""},
        environment={"container": "docker"},
    )
    try:
        b = Booted(container)
        deadline = time.monotonic() + 60
        while True:
            state = b.sh("systemctl is-system-running || true").strip()
            if state in ("running", "degraded"):
                break
            assert time.monotonic() < deadline, f"systemd did not boot: {state}"
            time.sleep(0.5)
        # The unit and settings file as deploy/install-host.sh places them; the
        # image's venv stands in for the one it makes (same nftsg, same Python).
        b.sh(
            f"src=/opt/nftsg/deploy/systemd/{UNIT}; test -e $src || src=/opt/nftsg/systemd/{UNIT}; "
            f"cp $src /etc/systemd/system/{UNIT}; mkdir -p /etc/nftsg; "
            "test -e /opt/nftsg/deploy/agent.yaml && cp -n /opt/nftsg/deploy/agent.yaml "
            "/etc/nftsg/agent.yaml || true"
        )
        exec_start = b.sh(f"systemctl cat {UNIT} | sed -n 's/^ExecStart=//p' | tail -1").split()
        assert exec_start, "the unit has no ExecStart"
        venv = str(Path(exec_start[0]).parent.parent)
        b.sh(f"test -x {exec_start[0]} || ln -sfn /opt/nftsg/.venv {venv}")
        b.sh(f"test -x {exec_start[0]}")
        b.sh("systemctl daemon-reload")
        shipped = b.show("Type", "WatchdogUSec", "ExecReload")
        if shipped["Type"] != "notify":
            b.dropin += ["Type=notify", "NotifyAccess=main"]
        # The shipped watchdog (60 s) would make the hung-agent test a minute long.
        b.dropin.append("WatchdogSec=3")
        if "path=" not in shipped.get("ExecReload", ""):
            b.dropin.append("ExecReload=/bin/kill -HUP $MAINPID")
        body = "\\n".join(["[Service]", *b.dropin])
        b.sh(f"mkdir -p {Path(DROPIN).parent} && printf '{body}\\n' > {DROPIN}")
        b.sh("systemctl daemon-reload")
        print(
            f"\nunit Type={shipped['Type']} WatchdogUSec={shipped['WatchdogUSec']}; "
            f"test drop-in: {', '.join(b.dropin)}"
        )
        # The lab's router and a stored topology, with no agent running yet.
        b.sh(
            "python - <<'EOF'\n"
            "from nftsg.agent.lab import Lab\n"
            "from nftsg.agent.lab_commands import read_topology\n"
            "from nftsg.agent.store import Store\n"
            "topology, network = read_topology('/opt/nftsg/examples/three-tier.yaml')\n"
            "Lab('nftsg').ensure_routers(network)\n"
            "import os; os.makedirs('/var/lib/nftsg', exist_ok=True)\n"
            "s = Store('/var/lib/nftsg/state.db')\n"
            "s.save_topology(topology.model_dump(mode='json'))\n"
            "s.set_setting('prefix', 'nftsg')\n"
            "EOF"
        )
        yield b
    finally:
        container.remove(force=True)


def test_active_only_once_rules_are_in_force(booted: Booted) -> None:
    assert booted.applied() == 0 and not booted.table_present()
    t0 = time.monotonic()
    booted.sh(f"systemctl start {UNIT}")  # Type=notify: returns once READY=1 arrived
    print(f"\nsystemctl start returned after {time.monotonic() - t0:.2f} s")
    props = booted.show("ActiveState", "SubState", "Type", "StatusText", "MainPID")
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    # READY came only after enforcement: the moment start returns, the rules are in.
    assert booted.applied() == 1
    assert booted.table_present()
    assert "in force" in props["StatusText"], props


def test_reload_resyncs_without_restart(booted: Booted) -> None:
    before = booted.show("MainPID", "NRestarts")
    since = booted.sh("date '+%Y-%m-%d %H:%M:%S'").strip()
    booted.sh(f"systemctl reload {UNIT}")
    deadline = time.monotonic() + 10
    while "reload" not in booted.sh(f"journalctl -u {UNIT} --since '{since}' -o cat"):
        assert time.monotonic() < deadline, "the agent logged no reload"
        time.sleep(0.2)
    while booted.show("ActiveState")["ActiveState"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    after = booted.show("MainPID", "NRestarts", "SubState")
    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"]
    assert after["SubState"] == "running"
    assert booted.table_present()


def test_watchdog_restarts_a_hung_agent(booted: Booted) -> None:
    before = booted.show("MainPID", "NRestarts", "WatchdogUSec")
    pid = before["MainPID"]
    booted.sh(f"kill -STOP {pid}")  # the loop hangs: no more WATCHDOG=1
    t0 = time.monotonic()
    deadline = t0 + 60
    while True:
        now = booted.show("MainPID", "NRestarts", "ActiveState", "SubState")
        # Rules stay in force while the agent hangs and while it restarts.
        assert booted.table_present()
        if now["MainPID"] not in (pid, "0") and now["ActiveState"] == "active":
            break
        assert time.monotonic() < deadline, f"not restarted: {now}"
        time.sleep(0.2)
    print(
        f"\nhung agent restarted after {time.monotonic() - t0:.1f} s "
        f"(WatchdogUSec={before['WatchdogUSec']})"
    )
    assert int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    journal = booted.sh(f"journalctl -u {UNIT} -o cat")
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert booted.applied() == 1
