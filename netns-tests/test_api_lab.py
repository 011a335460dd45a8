"""The ECS API of a running lab, through Alibaba Cloud's own SDK, with real traffic.

One lab for the module (`nftsg lab up` with a free API port and a private state
directory); every test drives actions through the unmodified SDK
(`alibabacloud-ecs20140526`, `protocol='http'`) and checks packets before and
after. Each test leaves the model as it found it.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alibabacloud_ecs20140526 import models
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi import models as openapi_models
from darabonba.runtime import RuntimeOptions
from e2e import CliLab, cli_lab, describe, write_yaml
from nftsg.agent import netns
from nftsg.agent.api_keys import AccessKey
from probes import ping, tcp_connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from alibabacloud_tea_openapi.exceptions import ClientException
from api_support import send, signed_request

pytestmark = pytest.mark.netns

VPC = "vpc-t"
REGION = "cn-hangzhou"
ADDR = {"i-a1": "10.1.1.10", "i-a2": "10.1.1.11", "i-b1": "10.1.1.20", "ext": "203.0.113.9"}

TOPOLOGY: dict[str, Any] = {
    "region_id": REGION,
    "vpcs": [
        {
            "vpc_id": VPC,
            "cidr_block": "10.1.0.0/16",
            "vswitches": [{"vswitch_id": "vsw-t", "cidr_block": "10.1.1.0/24"}],
        }
    ],
    "security_groups": [
        {
            "security_group_id": "sg-a",
            "vpc_id": VPC,
            "security_group_name": "a",
            "permissions": [],
        },
        {
            "security_group_id": "sg-b",
            "vpc_id": VPC,
            "security_group_name": "b",
            "inner_access_policy": "Drop",
            "permissions": [
                {
                    "direction": "ingress",
                    "ip_protocol": "TCP",
                    "port_range": "8080/8080",
                    "source_group_id": "sg-a",
                    "priority": 1,
                }
            ],
        },
        {"security_group_id": "sg-c", "vpc_id": VPC, "security_group_name": "c"},
        {
            "security_group_id": "sg-managed",
            "vpc_id": VPC,
            "security_group_name": "managed",
            "service_managed": True,
        },
    ],
    "instances": [
        {
            "instance_id": "i-a1",
            "vswitch_id": "vsw-t",
            "private_ip_address": ADDR["i-a1"],
            "security_group_ids": ["sg-a"],
        },
        {
            "instance_id": "i-a2",
            "vswitch_id": "vsw-t",
            "private_ip_address": ADDR["i-a2"],
            "security_group_ids": ["sg-a"],
        },
        {
            "instance_id": "i-b1",
            "vswitch_id": "vsw-t",
            "private_ip_address": ADDR["i-b1"],
            "security_group_ids": ["sg-b"],
        },
    ],
    "external_hosts": [{"name": "ext", "vpc_id": VPC, "ip_address": ADDR["ext"]}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiLab:
    def __init__(self, lab: CliLab, endpoint: str, key: AccessKey) -> None:
        self.lab = lab
        self.endpoint = endpoint
        self.key = key

    def client(self, key: AccessKey | None = None) -> Client:
        key = key or self.key
        return Client(
            openapi_models.Config(
                access_key_id=key.access_key_id,
                access_key_secret=key.access_key_secret,
                endpoint=self.endpoint,
                protocol="http",
                region_id=REGION,
                read_timeout=30000,
                connect_timeout=5000,
            )
        )

    def ns(self, name: str) -> str:
        return self.lab.external_ns(name) if name == "ext" else self.lab.instance_ns(name)

    def tcp(self, src: str, dst: str, port: int, timeout: float = 1.0) -> bool:
        return tcp_connect(self.ns(src), self.ns(dst), ADDR[dst], port, timeout=timeout)

    def revision(self) -> int:
        db = sqlite3.connect(self.lab.state_dir / "state.db")
        try:
            row = db.execute(
                "SELECT max(coalesce((SELECT revision FROM topology), 0), "
                "coalesce((SELECT max(revision) FROM mutations), 0))"
            ).fetchone()
        finally:
            db.close()
        return int(row[0])

    def table(self) -> str:
        proc = self.lab.run("lab", "exec", "--help")  # cheap no-op keeps the agent noted
        del proc
        out = netns_run(self.lab.router_ns(VPC), ["nft", "list", "table", "inet", "nftsg"])
        return out

    def rules(self, group: str, direction: str = "ingress") -> list[dict[str, Any]]:
        body = (
            self.client()
            .describe_security_group_attribute(
                models.DescribeSecurityGroupAttributeRequest(
                    region_id=REGION, security_group_id=group, direction=direction
                )
            )
            .body.to_map()
        )
        return list(body["Permissions"]["Permission"])


def netns_run(namespace: str, argv: list[str]) -> str:
    import subprocess

    proc = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, check=False
    )
    return proc.stdout


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> Iterator[ApiLab]:
    state = tmp_path_factory.mktemp("api-lab")
    port = free_port()
    with cli_lab(f"{run_prefix}p", state) as lab:
        created = lab.run("api-key", "create")
        assert created.returncode == 0, describe(created)
        key_doc = json.loads(created.stdout)
        key = AccessKey(key_doc["AccessKeyId"], key_doc["AccessKeySecret"], "")
        path = write_yaml(state / "lab.yaml", TOPOLOGY)
        proc = lab.run("lab", "up", str(path), "--api-listen", f"127.0.0.1:{port}", timeout=120)
        assert proc.returncode == 0, f"{describe(proc)}\n{lab.log_tail()}"
        yield ApiLab(lab, f"127.0.0.1:{port}", key)


def authorize(
    api: ApiLab, group: str, port: int, *, source_group: str | None = None, cidr: str | None = None
) -> None:
    api.client().authorize_security_group(
        models.AuthorizeSecurityGroupRequest(
            region_id=REGION,
            security_group_id=group,
            permissions=[
                models.AuthorizeSecurityGroupRequestPermissions(
                    ip_protocol="TCP",
                    port_range=f"{port}/{port}",
                    source_group_id=source_group,
                    source_cidr_ip=cidr,
                    priority="1",
                )
            ],
        )
    )


def revoke_spec(
    api: ApiLab, group: str, port: int, *, source_group: str | None = None, cidr: str | None = None
) -> None:
    api.client().revoke_security_group(
        models.RevokeSecurityGroupRequest(
            region_id=REGION,
            security_group_id=group,
            permissions=[
                models.RevokeSecurityGroupRequestPermissions(
                    ip_protocol="TCP",
                    port_range=f"{port}/{port}",
                    source_group_id=source_group,
                    source_cidr_ip=cidr,
                    priority="1",
                )
            ],
        )
    )


def rule_id(api: ApiLab, group: str, port: int, direction: str = "ingress") -> str:
    found = [r for r in api.rules(group, direction) if r["PortRange"] == f"{port}/{port}"]
    assert len(found) == 1, found
    return str(found[0]["SecurityGroupRuleId"])


def error_of(call: Any) -> tuple[int, str]:
    with pytest.raises(ClientException) as caught:
        call()
    exc: Any = caught.value
    return int(getattr(exc, "status_code", 0) or exc.data.get("statusCode", 0)), str(exc.code)


# -- the basic cycle -----------------------------------------------------------------


def test_the_lab_serves_the_api_and_the_model(api: ApiLab) -> None:
    body = (
        api.client()
        .describe_security_groups(models.DescribeSecurityGroupsRequest(region_id=REGION))
        .body.to_map()
    )
    ids = {g["SecurityGroupId"] for g in body["SecurityGroups"]["SecurityGroup"]}
    assert {"sg-a", "sg-b", "sg-c", "sg-managed"} <= ids
    assert api.tcp("i-a1", "i-b1", 8080)
    assert not api.tcp("i-b1", "i-a1", 8080, timeout=0.5)


def test_authorize_then_revoke_by_rule_id_and_by_spec(api: ApiLab) -> None:
    assert not api.tcp("ext", "i-a1", 9000, timeout=0.5)
    before = api.revision()
    authorize(api, "sg-a", 9000, cidr="203.0.113.0/24")
    # In force when the call returns: no waiting.
    assert api.tcp("ext", "i-a1", 9000)
    assert api.revision() == before + 1
    api.client().revoke_security_group(
        models.RevokeSecurityGroupRequest(
            region_id=REGION,
            security_group_id="sg-a",
            security_group_rule_id=[rule_id(api, "sg-a", 9000)],
        )
    )
    assert not api.tcp("ext", "i-a1", 9000, timeout=0.5)
    authorize(api, "sg-a", 9000, cidr="203.0.113.0/24")
    assert api.tcp("ext", "i-a1", 9000)
    revoke_spec(api, "sg-a", 9000, cidr="203.0.113.0/24")
    assert not api.tcp("ext", "i-a1", 9000, timeout=0.5)
    assert api.rules("sg-a") == []


def test_nftsg_ecs_reaches_the_running_agent(api: ApiLab) -> None:
    proc = api.lab.run(
        "ecs", "DescribeSecurityGroupAttribute", "--SecurityGroupId", "sg-b", "--RegionId", REGION
    )
    assert proc.returncode == 0, describe(proc)
    body = json.loads(proc.stdout)
    assert body["SecurityGroupId"] == "sg-b"
    assert len(body["Permissions"]["Permission"]) == 1
    proc = api.lab.run("ecs", "DeleteSecurityGroup", "--SecurityGroupId", "sg-b")
    assert proc.returncode != 0
    assert "DependencyViolation" in proc.stderr + proc.stdout


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


_unused = (threading, ping, netns, send, signed_request, RuntimeOptions)
