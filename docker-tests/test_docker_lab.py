"""The privileged Docker lab end to end: dockerd, images built without a registry,
the agent in a privileged container, every host of examples/three-tier.yaml in
its own `--network none` container, and real traffic between the containers
checked against the reference evaluator; then nothing of it is left."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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
