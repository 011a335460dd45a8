"""Labs side by side each serve metrics: an ephemeral loopback port, written to the
state dir's `metrics.addr` (the default 127.0.0.1:9380 would go to the first lab only)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from e2e import CliLab, cli_lab, describe, write_yaml
from test_api_lab import free_port

pytestmark = pytest.mark.netns

TOPOLOGY = {
    "vpcs": [
        {
            "vpc_id": "vpc-m",
            "cidr_block": "10.9.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-m", "cidr_block": "10.9.1.0/24"}],
        }
    ],
    "security_groups": [{"security_group_id": "sg-m", "vpc_id": "vpc-m"}],
    "instances": [
        {
            "instance_id": "i-m",
            "vswitch_id": "vsw-m",
            "private_ip_address": "10.9.1.10",
            "security_group_ids": ["sg-m"],
        }
    ],
}


class NoMetricsEnv(CliLab):
    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("NFTSG_METRICS_LISTEN", None)
        # A settings file of its own (without metrics_listen), not the host's.
        env["NFTSG_CONFIG"] = str(self.state_dir / "agent.yaml")
        return env


def _up(lab: CliLab, path: Path) -> str:
    (lab.state_dir / "agent.yaml").write_text("log_level: info\n")
    proc = lab.run("lab", "up", str(path), "--api-listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 0, f"{describe(proc)}\n{lab.log_tail()}"
    addr = (lab.state_dir / "metrics.addr").read_text().strip()
    assert f"metrics: http://{addr}/metrics" in proc.stdout
    return addr


def test_two_labs_each_serve_metrics_on_their_own_port(
    tmp_path_factory: pytest.TempPathFactory, run_prefix: str
) -> None:
    first_dir, second_dir = tmp_path_factory.mktemp("m1"), tmp_path_factory.mktemp("m2")
    with (
        cli_lab(f"{run_prefix}m1", first_dir) as one,
        cli_lab(f"{run_prefix}m2", second_dir) as two,
    ):
        labs = [NoMetricsEnv(one.prefix, one.state_dir), NoMetricsEnv(two.prefix, two.state_dir)]
        try:
            addrs = [_up(lab, write_yaml(lab.state_dir / "lab.yaml", TOPOLOGY)) for lab in labs]
            assert addrs[0] != addrs[1]
            for addr in addrs:
                with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
                    body = resp.read().decode()
                assert "nftsg_" in body
        finally:
            one.agent_pids |= labs[0].agent_pids
            two.agent_pids |= labs[1].agent_pids
    # `lab down` stopped the agents; they removed their address files.
    assert not (first_dir / "metrics.addr").exists()
