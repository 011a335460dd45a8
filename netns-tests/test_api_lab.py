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
from probes import tcp_connect

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
        return netns_run(self.lab.router_ns(VPC), ["nft", "list", "table", "inet", "nftsg"])

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


def eni_of(api: ApiLab, instance: str) -> str:
    body = (
        api.client()
        .describe_network_interfaces(
            models.DescribeNetworkInterfacesRequest(region_id=REGION, instance_id=instance)
        )
        .body.to_map()
    )
    rows = body["NetworkInterfaceSets"]["NetworkInterfaceSet"]
    assert len(rows) == 1, rows
    return str(rows[0]["NetworkInterfaceId"])


def set_groups(api: ApiLab, instance: str, groups: list[str]) -> None:
    api.client().modify_network_interface_attribute(
        models.ModifyNetworkInterfaceAttributeRequest(
            region_id=REGION, network_interface_id=eni_of(api, instance), security_group_id=groups
        )
    )


def copy_group(api: ApiLab, group: str, name: str) -> str:
    params = openapi_models.Params(
        action="CopySecurityGroup",
        version="2014-05-26",
        protocol="HTTP",
        pathname="/",
        method="POST",
        auth_type="AK",
        style="RPC",
        req_body_type="formData",
        body_type="json",
    )
    request = openapi_models.OpenApiRequest(
        query={"RegionId": REGION, "SecurityGroupId": group, "SecurityGroupName": name}
    )
    answer = api.client().call_api(params, request, RuntimeOptions())
    return str(answer["body"]["SecurityGroupId"])


def delete_group(api: ApiLab, group: str) -> None:
    api.client().delete_security_group(
        models.DeleteSecurityGroupRequest(region_id=REGION, security_group_id=group)
    )


def create_group(api: ApiLab, name: str) -> str:
    body = (
        api.client()
        .create_security_group(
            models.CreateSecurityGroupRequest(
                region_id=REGION, vpc_id=VPC, security_group_name=name
            )
        )
        .body.to_map()
    )
    return str(body["SecurityGroupId"])


# -- every action, with traffic before and after -------------------------------------------


def test_egress_rules(api: ApiLab) -> None:
    assert api.tcp("i-a1", "i-b1", 8080)
    drop = models.AuthorizeSecurityGroupEgressRequestPermissions(
        ip_protocol="TCP",
        port_range="8080/8080",
        dest_cidr_ip=f"{ADDR['i-b1']}/32",
        policy="drop",
        priority="1",
    )
    api.client().authorize_security_group_egress(
        models.AuthorizeSecurityGroupEgressRequest(
            region_id=REGION, security_group_id="sg-a", permissions=[drop]
        )
    )
    assert not api.tcp("i-a1", "i-b1", 8080, timeout=0.5)
    assert not api.tcp("i-a2", "i-b1", 8080, timeout=0.5)
    api.client().revoke_security_group_egress(
        models.RevokeSecurityGroupEgressRequest(
            region_id=REGION,
            security_group_id="sg-a",
            security_group_rule_id=[rule_id(api, "sg-a", 8080, "egress")],
        )
    )
    assert api.tcp("i-a1", "i-b1", 8080)


def test_modify_rule_and_egress_rule(api: ApiLab) -> None:
    rid = rule_id(api, "sg-b", 8080)
    api.client().modify_security_group_rule(
        models.ModifySecurityGroupRuleRequest(
            region_id=REGION,
            security_group_id="sg-b",
            security_group_rule_id=rid,
            port_range="8081/8081",
        )
    )
    assert api.tcp("i-a1", "i-b1", 8081)
    assert not api.tcp("i-a1", "i-b1", 8080, timeout=0.5)
    api.client().modify_security_group_rule(
        models.ModifySecurityGroupRuleRequest(
            region_id=REGION,
            security_group_id="sg-b",
            security_group_rule_id=rid,
            port_range="8080/8080",
        )
    )
    assert api.tcp("i-a1", "i-b1", 8080)
    assert not api.tcp("i-a1", "i-b1", 8081, timeout=0.5)
    # Egress: a drop rule moved from one port to another.
    api.client().authorize_security_group_egress(
        models.AuthorizeSecurityGroupEgressRequest(
            region_id=REGION,
            security_group_id="sg-a",
            permissions=[
                models.AuthorizeSecurityGroupEgressRequestPermissions(
                    ip_protocol="TCP",
                    port_range="7100/7100",
                    dest_cidr_ip="0.0.0.0/0",
                    policy="drop",
                    priority="1",
                )
            ],
        )
    )
    assert not api.tcp("i-a1", "ext", 7100, timeout=0.5)
    erid = rule_id(api, "sg-a", 7100, "egress")
    api.client().modify_security_group_egress_rule(
        models.ModifySecurityGroupEgressRuleRequest(
            region_id=REGION,
            security_group_id="sg-a",
            security_group_rule_id=erid,
            port_range="7101/7101",
        )
    )
    assert api.tcp("i-a1", "ext", 7100)
    assert not api.tcp("i-a1", "ext", 7101, timeout=0.5)
    api.client().revoke_security_group_egress(
        models.RevokeSecurityGroupEgressRequest(
            region_id=REGION, security_group_id="sg-a", security_group_rule_id=[erid]
        )
    )
    assert api.tcp("i-a1", "ext", 7101)


def policy(api: ApiLab, group: str, value: str) -> None:
    api.client().modify_security_group_policy(
        models.ModifySecurityGroupPolicyRequest(
            region_id=REGION, security_group_id=group, inner_access_policy=value
        )
    )


def test_inner_policy_accept_drop_accept(api: ApiLab) -> None:
    assert api.tcp("i-a1", "i-a2", 7000)
    policy(api, "sg-a", "Drop")
    assert not api.tcp("i-a1", "i-a2", 7000, timeout=0.5)
    policy(api, "sg-a", "Accept")
    assert api.tcp("i-a1", "i-a2", 7000)


def test_join_and_leave(api: ApiLab) -> None:
    assert not api.tcp("i-a1", "i-b1", 7000, timeout=0.5)
    api.client().join_security_group(
        models.JoinSecurityGroupRequest(
            region_id=REGION, security_group_id="sg-a", instance_id="i-b1"
        )
    )
    assert api.tcp("i-a1", "i-b1", 7000)  # sg-a's members reach each other
    _status, code = error_of(
        lambda: api.client().join_security_group(
            models.JoinSecurityGroupRequest(
                region_id=REGION, security_group_id="sg-a", instance_id="i-b1"
            )
        )
    )
    assert code == "InvalidInstanceId.AlreadyExists"
    api.client().leave_security_group(
        models.LeaveSecurityGroupRequest(
            region_id=REGION, security_group_id="sg-a", instance_id="i-b1"
        )
    )
    assert not api.tcp("i-a1", "i-b1", 7000, timeout=0.5)
    assert api.tcp("i-a1", "i-b1", 8080)


def test_modify_network_interface_attribute_replaces_the_groups(api: ApiLab) -> None:
    assert api.tcp("i-a1", "i-b1", 8080)
    set_groups(api, "i-b1", ["sg-c"])
    assert not api.tcp("i-a1", "i-b1", 8080, timeout=0.5)
    set_groups(api, "i-b1", ["sg-c", "sg-a"])
    assert api.tcp("i-a1", "i-b1", 7000)
    set_groups(api, "i-b1", ["sg-b"])
    assert api.tcp("i-a1", "i-b1", 8080)
    assert not api.tcp("i-a1", "i-b1", 7000, timeout=0.5)


def test_delete_security_group_dependency_violation(api: ApiLab) -> None:
    before = api.revision()
    # sg-b has a member; sg-a is referenced by sg-b's rule.
    for group in ("sg-b", "sg-a"):
        status, code = error_of(lambda g=group: delete_group(api, g))
        assert (status, code) == (403, "DependencyViolation")
    assert api.revision() == before
    assert api.tcp("i-a1", "i-b1", 8080)
    fresh = create_group(api, "scratch")
    delete_group(api, fresh)
    assert api.revision() == before + 2


def test_managed_groups_refuse_writes(api: ApiLab) -> None:
    before = api.revision()
    status, code = error_of(lambda: authorize(api, "sg-managed", 9001, cidr="0.0.0.0/0"))
    assert (status, code) == (403, "InvalidOperation.ResourceManagedByCloudProduct")
    status, code = error_of(
        lambda: api.client().join_security_group(
            models.JoinSecurityGroupRequest(
                region_id=REGION, security_group_id="sg-managed", instance_id="i-a1"
            )
        )
    )
    assert code == "InvalidOperation.ResourceManagedByCloudProduct"
    status, code = error_of(lambda: delete_group(api, "sg-managed"))
    assert code == "InvalidOperation.ResourceManagedByCloudProduct"
    assert api.revision() == before
    # Reading them is fine.
    assert api.rules("sg-managed") == []


def test_quotas(api: ApiLab) -> None:
    group = create_group(api, "quota")
    try:
        many = [
            models.AuthorizeSecurityGroupRequestPermissions(
                ip_protocol="TCP",
                port_range=f"{20000 + k}/{20000 + k}",
                source_cidr_ip="203.0.113.0/24",
            )
            for k in range(101)
        ]
        status, code = error_of(
            lambda: api.client().authorize_security_group(
                models.AuthorizeSecurityGroupRequest(
                    region_id=REGION, security_group_id=group, permissions=many
                )
            )
        )
        assert code == "InvalidParam.PermissionsCount"
        for chunk in (
            many[:100],
            [
                *many[100:],
                *(
                    models.AuthorizeSecurityGroupRequestPermissions(
                        ip_protocol="UDP",
                        port_range=f"{20000 + k}/{20000 + k}",
                        source_cidr_ip="203.0.113.0/24",
                    )
                    for k in range(99)
                ),
            ],
        ):
            api.client().authorize_security_group(
                models.AuthorizeSecurityGroupRequest(
                    region_id=REGION, security_group_id=group, permissions=chunk
                )
            )
        before = api.revision()
        status, code = error_of(lambda: authorize(api, group, 30000, cidr="203.0.113.0/24"))
        assert (status, code) == (403, "AuthorizationLimitExceed")
        assert api.revision() == before
        # An ENI of sg-a would be subject to sg-a's rules plus these 200: still allowed
        # (1000 across groups), and joining works; the traffic it allows is real.
        api.client().join_security_group(
            models.JoinSecurityGroupRequest(
                region_id=REGION, security_group_id=group, instance_id="i-a1"
            )
        )
        assert api.tcp("ext", "i-a1", 20005)
        api.client().leave_security_group(
            models.LeaveSecurityGroupRequest(
                region_id=REGION, security_group_id=group, instance_id="i-a1"
            )
        )
        assert not api.tcp("ext", "i-a1", 20005, timeout=0.5)
    finally:
        delete_group(api, group)


def test_copy_security_group(api: ApiLab) -> None:
    copy = copy_group(api, "sg-b", "b-trial")
    try:
        assert [(r["PortRange"], r["SourceGroupId"]) for r in api.rules(copy)] == [
            ("8080/8080", "sg-a")
        ]
        assert rule_id(api, copy, 8080) != rule_id(api, "sg-b", 8080)
        set_groups(api, "i-b1", [copy])
        assert api.tcp("i-a1", "i-b1", 8080)  # the copy allows what the original did
        authorize(api, copy, 8082, source_group="sg-a")  # try a change on the copy
        assert api.tcp("i-a1", "i-b1", 8082)
        set_groups(api, "i-b1", ["sg-b"])
        assert not api.tcp("i-a1", "i-b1", 8082, timeout=0.5)  # the original is untouched
        assert len(api.rules("sg-b")) == 1
    finally:
        set_groups(api, "i-b1", ["sg-b"])
        delete_group(api, copy)


def test_tags_on_groups(api: ApiLab) -> None:
    api.client().tag_resources(
        models.TagResourcesRequest(
            region_id=REGION,
            resource_type="securitygroup",
            resource_id=["sg-c"],
            tag=[models.TagResourcesRequestTag(key="env", value="lab")],
        )
    )
    body = (
        api.client()
        .list_tag_resources(
            models.ListTagResourcesRequest(
                region_id=REGION, resource_type="securitygroup", resource_id=["sg-c"]
            )
        )
        .body.to_map()
    )
    assert [(t["TagKey"], t["TagValue"]) for t in body["TagResources"]["TagResource"]] == [
        ("env", "lab")
    ]
    api.client().untag_resources(
        models.UntagResourcesRequest(
            region_id=REGION, resource_type="securitygroup", resource_id=["sg-c"], tag_key=["env"]
        )
    )


def test_describe_instances(api: ApiLab) -> None:
    body = (
        api.client()
        .describe_instances(
            models.DescribeInstancesRequest(region_id=REGION, security_group_id="sg-a")
        )
        .body.to_map()
    )
    assert sorted(i["InstanceId"] for i in body["Instances"]["Instance"]) == ["i-a1", "i-a2"]


# -- existing flows: no blink, cut -------------------------------------------------


class EchoServer:
    """A TCP echo server in a namespace, one thread per connection."""

    def __init__(self, namespace: str, address: str, port: int) -> None:
        with netns.entered(namespace):
            self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(64)
                except OSError:
                    return
                if not data:
                    return
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        except OSError:
            pass
        self.sock.close()
        self.thread.join(2)


def connect(api: ApiLab, src: str, dst: str, port: int) -> socket.socket:
    with netns.entered(api.ns(src)):
        sock = socket.socket()
    sock.settimeout(2)
    sock.connect((ADDR[dst], port))
    return sock


def try_connect(api: ApiLab, src: str, dst: str, port: int, timeout: float) -> bool:
    with netns.entered(api.ns(src)):
        sock = socket.socket()
    sock.settimeout(timeout)
    try:
        sock.connect((ADDR[dst], port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def echo_ok(sock: socket.socket, timeout: float = 0.5) -> bool:
    sock.settimeout(timeout)
    try:
        sock.sendall(b"ping")
        return sock.recv(64) == b"ping"
    except OSError:
        return False


def test_no_blink_during_a_hundred_unrelated_changes(api: ApiLab) -> None:
    server = EchoServer(api.ns("i-b1"), ADDR["i-b1"], 8080)
    stop = threading.Event()
    sent = lost = 0
    denied_answers = denied_tries = 0
    try:
        conn = connect(api, "i-a1", "i-b1", 8080)

        def probe() -> None:
            nonlocal sent, lost
            while not stop.is_set():
                sent += 1
                if not echo_ok(conn, timeout=1.0):
                    lost += 1
                time.sleep(0.002)

        def denied() -> None:
            nonlocal denied_answers
            while not stop.is_set():
                nonlocal denied_tries
                denied_tries += 1
                if try_connect(api, "ext", "i-b1", 8080, timeout=0.05):
                    denied_answers += 1

        threads = [threading.Thread(target=probe), threading.Thread(target=denied)]
        for t in threads:
            t.start()
        scratch = create_group(api, "blink")
        for k in range(50):  # 100 changes that do not concern the probed flows
            authorize(api, scratch, 40000 + k, cidr="198.51.100.0/24")
            api.client().revoke_security_group(
                models.RevokeSecurityGroupRequest(
                    region_id=REGION,
                    security_group_id=scratch,
                    security_group_rule_id=[rule_id(api, scratch, 40000 + k)],
                )
            )
        stop.set()
        for t in threads:
            t.join()
        delete_group(api, scratch)
        conn.close()
    finally:
        stop.set()
        server.close()
    assert sent > 100
    assert lost == 0, f"{lost} of {sent} echoes lost"
    assert denied_tries >= 5
    assert denied_answers == 0


def test_cut_an_open_connection_whose_only_rule_is_revoked(api: ApiLab) -> None:
    a1 = f"{ADDR['i-a1']}/32"
    authorize(api, "sg-b", 9443, cidr=a1)  # 9443: allowed twice (cidr and sg-a)
    authorize(api, "sg-b", 9443, source_group="sg-a")
    authorize(api, "sg-b", 9444, cidr=a1)  # 9444: only by this rule
    servers = [EchoServer(api.ns("i-b1"), ADDR["i-b1"], p) for p in (9443, 9444)]
    try:
        both = connect(api, "i-a1", "i-b1", 9443)
        only = connect(api, "i-a1", "i-b1", 9444)
        assert echo_ok(both) and echo_ok(only)
        revoke_spec(api, "sg-b", 9444, cidr=a1)
        revoke_spec(api, "sg-b", 9443, cidr=a1)
        # At once: the first packet after the call returned is dropped.
        assert not echo_ok(only, timeout=0.5)
        assert echo_ok(both)
        both.close()
        only.close()
    finally:
        for s in servers:
            s.close()
        revoke_spec(api, "sg-b", 9443, source_group="sg-a")
        revoke_spec(api, "sg-b", 9444, cidr=a1)


# -- authentication: each failure changes nothing -------------------------------------

AUTH_QUERY = {
    "RegionId": REGION,
    "SecurityGroupId": "sg-a",
    "Permissions.1.IpProtocol": "TCP",
    "Permissions.1.PortRange": "9555/9555",
    "Permissions.1.SourceCidrIp": "203.0.113.0/24",
}


def _forged(api: ApiLab, how: str) -> tuple[str, dict[str, str]]:
    key = api.key
    if how == "unknown key":
        key = AccessKey("LTAI" + "x" * 20, key.access_key_secret, "")
    elif how == "wrong secret":
        key = AccessKey(key.access_key_id, "not-the-secret", "")
    date = None
    if how == "expired":
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    path, headers, _ = signed_request(
        api.endpoint, key, "AuthorizeSecurityGroup", AUTH_QUERY, date=date
    )
    if how == "missing":
        del headers["Authorization"]
    elif how == "malformed":
        headers["Authorization"] = "ACS3-HMAC-SHA256 Credential=LTAIx,Signature=abc"
    elif how == "tampered":
        path = path.replace("9555%2F9555", "1%2F65535")
    return path, headers


@pytest.mark.parametrize(
    ("how", "status", "code"),
    [
        ("missing", 400, "IncompleteSignature"),
        ("malformed", 400, "IncompleteSignature"),
        ("wrong secret", 400, "SignatureDoesNotMatch"),
        ("tampered", 400, "SignatureDoesNotMatch"),
        ("unknown key", 404, "InvalidAccessKeyId.NotFound"),
        ("expired", 400, "InvalidTimeStamp.Expired"),
    ],
)
def test_auth_failure_changes_nothing(api: ApiLab, how: str, status: int, code: str) -> None:
    before = api.revision()
    path, headers = _forged(api, how)
    got, answer = send(api.endpoint, "POST", path, headers)
    assert (got, answer["Code"]) == (status, code), answer
    assert api.revision() == before
    assert all(r["PortRange"] != "9555/9555" for r in api.rules("sg-a"))
    assert not api.tcp("ext", "i-a1", 9555, timeout=0.5)


def test_replayed_nonce_changes_nothing(api: ApiLab) -> None:
    before = api.revision()
    path, headers = _forged(api, "valid")
    got, answer = send(api.endpoint, "POST", path, headers)
    assert got == 200, answer
    assert api.revision() == before + 1
    assert api.tcp("ext", "i-a1", 9555)
    revoke_spec(api, "sg-a", 9555, cidr="203.0.113.0/24")
    after = api.revision()
    got, answer = send(api.endpoint, "POST", path, headers)  # the very same request again
    assert (got, answer["Code"]) == (400, "SignatureNonceUsed"), answer
    assert api.revision() == after
    assert not api.tcp("ext", "i-a1", 9555, timeout=0.5)


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# -- restart, clone, plan, apply (these come last: apply replaces the model) ---------------


def test_a_killed_agent_restarts_with_the_calls_it_accepted(api: ApiLab) -> None:
    import os
    import signal
    import subprocess

    authorize(api, "sg-a", 9600, cidr="203.0.113.0/24")
    group = create_group(api, "survivor")
    assert api.tcp("ext", "i-a1", 9600)
    pid = api.lab.agent_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: api.lab.agent_pid() is None, 5)
    with open(api.lab.state_dir / "agent.log", "ab") as log:
        subprocess.Popen(
            [str(Path(sys.executable).with_name("nftsg")), "agent", "--api-listen", api.endpoint],
            env=api.lab.env(),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    assert wait_until(lambda: api.lab.agent_pid() is not None, 10)
    api.lab.agent_pids.add(api.lab.agent_pid() or 0)

    def answering() -> bool:
        try:
            api.rules("sg-a")
            return True
        except Exception:
            return False

    assert wait_until(answering, 20), api.lab.log_tail()
    assert [r["PortRange"] for r in api.rules("sg-a")] == ["9600/9600"]
    assert api.tcp("ext", "i-a1", 9600)
    revoke_spec(api, "sg-a", 9600, cidr="203.0.113.0/24")
    assert not api.tcp("ext", "i-a1", 9600, timeout=0.5)
    delete_group(api, group)


def test_clone_command(api: ApiLab) -> None:
    proc = api.lab.run("clone", "sg-b", "--name", "b-clone")
    assert proc.returncode == 0, describe(proc)
    copy = json.loads(proc.stdout)["SecurityGroupId"]
    assert [r["PortRange"] for r in api.rules(copy)] == ["8080/8080"]
    delete_group(api, copy)
    proc = api.lab.run("clone", "sg-nope")
    assert proc.returncode != 0
    assert "InvalidSecurityGroupId.NotFound" in proc.stderr


def test_plan_changes_nothing_and_apply_makes_it_so(api: ApiLab) -> None:
    import copy as copy_module

    changed = copy_module.deepcopy(TOPOLOGY)
    changed["security_groups"][1]["permissions"][0]["port_range"] = "8085/8085"
    path = write_yaml(api.lab.state_dir / "changed.yaml", changed)
    before = api.revision()
    proc = api.lab.run("plan", str(path))
    assert proc.returncode == 0, describe(proc)
    assert "- rule sg-b: ingress" in proc.stdout and "8080" in proc.stdout
    assert "+ rule sg-b: ingress" in proc.stdout and "8085" in proc.stdout
    assert f"router {api.lab.router_ns(VPC)}:" in proc.stdout
    assert api.revision() == before
    assert api.tcp("i-a1", "i-b1", 8080)
    assert not api.tcp("i-a1", "i-b1", 8085, timeout=0.5)
    proc = api.lab.run("apply", str(path))
    assert proc.returncode == 0, describe(proc)
    assert api.tcp("i-a1", "i-b1", 8085)
    assert not api.tcp("i-a1", "i-b1", 8080, timeout=0.5)
    # The API sees the applied model at once.
    assert [r["PortRange"] for r in api.rules("sg-b")] == ["8085/8085"]
    original = write_yaml(api.lab.state_dir / "original.yaml", TOPOLOGY)
    proc = api.lab.run("apply", str(original))
    assert proc.returncode == 0, describe(proc)
    assert api.tcp("i-a1", "i-b1", 8080)
    proc = api.lab.run("plan", str(original))
    assert "(no change to groups, rules or memberships)" in proc.stdout
    assert f"router {api.lab.router_ns(VPC)}: 0 nft commands" in proc.stdout
